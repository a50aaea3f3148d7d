"""RTATL (paper 004): the method (``method.py``), its AU regions (``regions.py``), recognition network
(``network.py``) and RoI inpainting parts (``inpaint.py``)."""
