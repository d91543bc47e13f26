"""Training: Lightning fine-tuning of injected memories (teacher forcing, rolling-memory TBPTT, self-rollout DMD)."""

from .callbacks import ExportMemoryWeights, StepTimer
from .flow import NoiseLevels
from .losses import RollingMemory, SelfRolloutDMD, TeacherForcing, TrainingLoss
from .module import MemoryFinetune
from .trainable import LoraOptions

__all__ = ["MemoryFinetune", "TrainingLoss", "TeacherForcing", "RollingMemory", "SelfRolloutDMD", "NoiseLevels",
           "LoraOptions", "ExportMemoryWeights", "StepTimer"]
