"""Fine-tune a hybrid memory in two stages with Lightning, then stream with it (CPU, about a minute).

    python examples/finetune_lightning.py

1. Stage 1, teacher forcing on short procedural clips: the global read-out moves off zero.
2. Stage 2, rolling-memory TBPTT on longer clips, starting from stage 1's memory weights.
3. Stream a video with the trained memory and with the untrained one (which equals sink_window).
Random backbone weights stand in for a checkpoint: pass BackboneSpec(checkpoint=...) for a real model.
"""

import tempfile
import warnings
from pathlib import Path

import lightning as L
import torch

import adapters
import memkit
from adapters.loading import BackboneSpec
from memkit.data import ClipDataModule, ProceduralVideos
from memkit.rollout import StreamingGenerator
from memkit.train import MemoryFinetune, RollingMemory, TeacherForcing

warnings.filterwarnings("ignore")
out = Path(tempfile.mkdtemp())
backbone = BackboneSpec(size="tiny", overrides={"in_channels": 3, "out_channels": 3})  # a pixel-space Wan DiT
memory = memkit.MemoryConfig(kind="hybrid_gdn", sink_frames=1, window_frames=3, rope_mode="relative")
latent_size = (8, 8)


def fit(loss, frames, steps, memory_weights=None):
    module = MemoryFinetune(backbone=backbone, memory=memory, loss=loss, latent_size=latent_size, lr=3e-3,
                            memory_weights=memory_weights)
    data = ClipDataModule(ProceduralVideos(count=32, frames=48), frames=frames, batch_size=2,
                          val_source=ProceduralVideos(count=2, frames=frames, seed=99))
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)
    before = trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    trainer.fit(module, datamodule=data)
    after = trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    print(f"{type(loss).__name__}: {steps} steps on clips of {frames} latent frames, val loss {before:.4f} -> "
          f"{after:.4f}")
    return module


stage1 = fit(TeacherForcing(), frames=12, steps=30)
memkit.save_memory(stage1.model, out / "stage1.safetensors")
stage2 = fit(RollingMemory(tbptt_chunks=4), frames=24, steps=10, memory_weights=out / "stage1.safetensors")
memkit.save_memory(stage2.model, out / "memory.safetensors")
print(f"memory weights: {(out / 'memory.safetensors').stat().st_size / 1024:.0f} KiB")

# Stream with the trained memory, and with a fresh (untrained) injection of the same backbone.
prompt = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(0))
model = stage2.model
trained = torch.cat([c.latents for c in StreamingGenerator(stage2.handle, prompt, progress=False).stream(6)], 2)
adapters.remove(model)
handle = adapters.inject(model, memory, chunk_frames=3, latent_size=latent_size)
plain = torch.cat([c.latents for c in StreamingGenerator(handle, prompt, progress=False).stream(6)], 2)
memkit.load_memory(model, out / "memory.safetensors")
loaded = torch.cat([c.latents for c in StreamingGenerator(handle, prompt, progress=False).stream(6)], 2)
print("first chunks equal (nothing evicted yet):", torch.equal(trained[:, :, :3], plain[:, :, :3]))
print("trained memory changes later chunks:", bool((trained[:, :, 9:] - plain[:, :, 9:]).abs().max() > 0))
print("reloaded weights reproduce the stream:", torch.equal(loaded, trained))
