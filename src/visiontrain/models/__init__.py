"""Models: a registry of builders (built-in, timm, torchvision) and init schemes."""

from visiontrain.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
