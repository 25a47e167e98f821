"""The file MLflow logs as the model's code ("models from code"): nothing is pickled.

MLflow runs this file when the model is loaded; `set_model` names the PythonModel to serve.
"""

from mlflow.models import set_model

from cnnpipe.serving.pyfunc import ImageClassifier

set_model(ImageClassifier())
