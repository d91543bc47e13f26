"""Training losses of :class:`memkit.train.MemoryFinetune`, one module each."""

from .base import TrainingLoss
from .rolling import RollingMemory
from .self_rollout import SelfRolloutDMD
from .teacher_forcing import TeacherForcing

__all__ = ["TrainingLoss", "TeacherForcing", "RollingMemory", "SelfRolloutDMD"]
