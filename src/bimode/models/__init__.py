from bimode.models.loading import load_model, prepare_processor

__all__ = ["load_model", "prepare_processor"]
