"""The main job's embedded default: tiny diffusion models trained by the project on
scikit-learn's digits, the metrics to judge their samples, and ``asag demo``."""
