"""The MLflow model's code (logged "from code" by ``ssau.predict.mlflow_model.log_model``): no pickled object."""

from mlflow.models import set_model

from ssau.predict.mlflow_model import AUModel

set_model(AUModel())
