"""Using what was trained: ``ssau predict`` (``command``: images, folders, videos, shard directories -> one row per
face per frame), the model it reads (``model``: run directory, model.pt or MLflow URI, with its card), faces made the
way the training shards made them (``faces``, ``inputs``), the MLflow pyfunc model every run logs (``mlflow_model``)
and ``ssau export --onnx`` (``export``)."""
