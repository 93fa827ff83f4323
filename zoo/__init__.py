"""zoo: ResNeXt and DenseNet classifiers with selectable normalization."""
from zoo.registry import count_params, create_model, get_model_spec, list_models
from zoo.weights import WeightsError, load_weights

__all__ = ["WeightsError", "count_params", "create_model", "get_model_spec", "list_models", "load_weights"]
