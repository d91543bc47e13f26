"""Training on CUDA (run on the GPU machine): a short bf16 fine-tune of the Wan2.1-1.3B shape for each loss,
memory-only with activation checkpointing, with steps/s and peak memory printed for docs/training.md.

    pytest -q -s tests/gpu/test_gpu_train.py
"""

import lightning as L
import pytest
import torch

import memkit
from adapters.loading import BackboneSpec
from memkit.train import MemoryFinetune, RollingMemory, SelfRolloutDMD, StepTimer, TeacherForcing

pytestmark = pytest.mark.gpu

LATENT = (60, 104)  # 832x480
SPEC = BackboneSpec(size="1.3B", dtype="bfloat16")


class Repeat(torch.utils.data.IterableDataset):
    def __init__(self, frames):
        gen = torch.Generator().manual_seed(0)
        self.batch = {"latents": torch.randn(1, 16, frames, *LATENT, generator=gen),
                      "prompt_embeds": torch.randn(1, 512, 4096, generator=gen)}

    def __iter__(self):
        while True:
            yield self.batch


@pytest.mark.parametrize("name,frames", [("teacher_forcing", 21), ("rolling", 48), ("self_rollout", 21)])
def test_bf16_memory_finetune_of_the_1p3b_shape(name, frames):
    loss = {"teacher_forcing": lambda: TeacherForcing(),
            "rolling": lambda: RollingMemory(tbptt_chunks=4),
            "self_rollout": lambda: SelfRolloutDMD(teacher=BackboneSpec(size="1.3B", seed=1, dtype="bfloat16"),
                                                   rollout_chunks=7, window_chunks=3, generator_every=1)}[name]()
    module = MemoryFinetune(backbone=SPEC, memory=memkit.MemoryConfig(kind="hybrid_gdn", rope_mode="relative"),
                            loss=loss, latent_size=LATENT, activation_checkpointing=True)
    before = {k: v.clone() for k, v in module.model.state_dict().items() if ".memory." in k}
    timer = StepTimer(warmup=1)
    torch.cuda.reset_peak_memory_stats()
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=10**9, limit_train_batches=4,
                        max_epochs=1, logger=False, enable_checkpointing=False, callbacks=[timer])
    trainer.fit(module, torch.utils.data.DataLoader(Repeat(frames), batch_size=None))
    peak = torch.cuda.max_memory_allocated() / 2**30
    step = sorted(timer.times)[len(timer.times) // 2]
    print(f"\n{name}: {frames} latent frames, {1 / step:.3f} steps/s ({step:.2f} s/step), peak {peak:.1f} GiB")
    after = module.model.state_dict()
    assert all(after[k].dtype == torch.float32 for k in before)
    assert any(not torch.equal(after[k], v) for k, v in before.items())
    assert peak < 78
