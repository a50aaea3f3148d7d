"""The methods: one file per paper, named as its readers know it, behind the contract in ``base``; shared parts in
``parts``; the registry (config name -> class) in ``registry``."""
