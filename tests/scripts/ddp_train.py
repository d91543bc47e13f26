"""Run by tests/test_train_ddp.py: a few memory-training steps on two CPU ranks (Lightning's "ddp" or "fsdp"
strategy relaunches this script for rank 1); each rank saves its trained parameters and the items it saw.

    python tests/scripts/ddp_train.py OUT_DIR teacher_forcing|rolling ddp|ddp_find_unused_parameters_true|fsdp
"""

import json
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file

import memkit
from adapters.loading import BackboneSpec
from memkit.data import ClipDataModule
from memkit.data.sources import ClipSource
from memkit.train import MemoryFinetune, RollingMemory, TeacherForcing

warnings.filterwarnings("ignore")
torch.set_num_threads(1)


class RandomLatents(ClipSource):
    modality = "latents"

    def __len__(self):
        return 8

    def describe(self, index):
        return f"random clip {index}"

    def num_frames(self, index):
        return 9

    def read(self, index, start, frames, size):
        gen = torch.Generator().manual_seed(index)
        return {"latents": torch.randn(3, 9, *size, generator=gen)[:, start: start + frames]}


def main(out: Path, loss: str, strategy: str) -> None:
    spec = BackboneSpec(size="tiny", overrides={"in_channels": 3, "out_channels": 3})
    memory = memkit.MemoryConfig(kind="hybrid_gdn", sink_frames=1, window_frames=3)
    objective = TeacherForcing() if loss == "teacher_forcing" else RollingMemory(tbptt_chunks=2)
    module = MemoryFinetune(backbone=spec, memory=memory, loss=objective, latent_size=(4, 4), lr=1e-2)
    seen = []
    step = module.training_step

    def record(batch, batch_idx=0):
        seen.extend(batch["index"].tolist())
        return step(batch, batch_idx)

    module.training_step = record
    accelerator, devices = "cpu", 2
    if strategy == "fsdp":  # GPU only in Lightning; shard each block, frozen and trained weights side by side
        from diffusers.models.transformers.transformer_wan import WanTransformerBlock
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = FSDPStrategy(auto_wrap_policy={WanTransformerBlock}, use_orig_params=True)
        accelerator, devices = "gpu", torch.cuda.device_count()
    trainer = L.Trainer(accelerator=accelerator, devices=devices, strategy=strategy, max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=ClipDataModule(RandomLatents(), frames=9, batch_size=1))
    rank = trainer.global_rank
    params = {n: p.detach().contiguous() for n, p in module.named_parameters() if p.requires_grad}
    save_file(params, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"seen": seen, "world": trainer.world_size}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
