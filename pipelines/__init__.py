from pipelines.evaluation import evaluation_pipeline
from pipelines.inference import inference_pipeline
from pipelines.monitoring import monitoring_pipeline
from pipelines.training import training_pipeline

__all__ = ["training_pipeline", "inference_pipeline", "monitoring_pipeline", "evaluation_pipeline"]
