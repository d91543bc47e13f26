"""Generation: the chunk loop (few-step denoising that reads memory, a context pass that commits),
prompt schedules with switches, prefixes, streaming VAE decode, mp4 output, saving and resuming."""

from .generator import Chunk, StreamingGenerator
from .schedule import FlowSchedule, PromptSchedule

__all__ = ["StreamingGenerator", "Chunk", "FlowSchedule", "PromptSchedule"]
