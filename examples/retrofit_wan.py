"""Retrofit a diffusers Wan2.1 DiT with VideoSSM's hybrid memory and stream a video from it (CPU, < 1 min).

    python examples/retrofit_wan.py

1. Inject a `full` memory and check the adapter reproduces the stock model.
2. Inject `hybrid_gdn`: before training it changes nothing (zero-initialised global read-out).
3. Stream chunks with a prompt switch, save the stream mid-way and resume it bit-identically.
4. Decode chunk by chunk with the causal VAE into an mp4.
Random weights stand in for a checkpoint: swap `random_wan` for `WanTransformer3DModel.from_pretrained(...)`.
"""

import tempfile
from pathlib import Path

import torch

import adapters
import memkit
from memkit.rollout import StreamingGenerator
from memkit.rollout.vae import tiny_wan_vae
from memkit.rollout.video import VideoWriter

out = Path(tempfile.mkdtemp())
model = adapters.random_wan("tiny")                 # a WanTransformer3DModel: 2 blocks, 2 heads x 16
latent_size = (8, 8)                                # 64x64 video through the 8x VAE
torch.manual_seed(0)
latents = torch.randn(1, 16, 3, *latent_size)       # one chunk of 3 latent frames
prompt = torch.randn(1, 16, model.config.text_dim)  # prompt embeddings (a T5 encoder's output for a real model)
t = torch.tensor([500.0])

with torch.no_grad():
    stock = model(latents, t, prompt, return_dict=False)[0]

    # 1. the adapter is faithful: a full-context memory over one chunk is the stock forward
    h = adapters.inject(model, memkit.MemoryConfig(kind="full"), chunk_frames=3, latent_size=latent_size)
    same = h.read(h.init_state(batch=1), latents, t, prompt)
    print("full memory == stock forward:", torch.allclose(same, stock, atol=1e-6))
    adapters.remove(model)

    # 2. the hybrid memory, injected into a pretrained model, changes nothing until it is trained
    cfg = memkit.MemoryConfig(kind="hybrid_gdn", sink_frames=3, window_frames=6, rope_mode="relative")
    h = adapters.inject(model, cfg, chunk_frames=3, latent_size=latent_size)
    print("hybrid_gdn before training == stock:", torch.allclose(h.read(h.init_state(1), latents, t, prompt), stock,
                                                                 atol=1e-6))
    print(f"trainable memory parameters: {sum(p.numel() for p in h.memory_parameters())}")
    for mem in h.memories:  # pretend it was trained, so the global memory shows
        torch.nn.init.normal_(mem.out_gate.weight, std=0.05)

# 3. stream with a prompt switch at chunk 6; save at chunk 4 and resume
prompts = {"a cat": prompt, "a dog": torch.randn(1, 16, model.config.text_dim)}
vae = tiny_wan_vae()
gen = StreamingGenerator(h, prompts, switches=[6], vae=vae, seed=0)
rest = []
with VideoWriter(out / "video.mp4", fps=16) as writer:
    for chunk in gen.stream(10):
        writer.write(chunk.video)                    # decoded as it is made
        if chunk.index == 3:
            gen.save(out / "stream.safetensors")     # memories, cursor, prompt, RNG and VAE cache
        elif chunk.index > 3:
            rest.append(chunk.latents)
print(f"wrote {writer.frames_written} frames to {out / 'video.mp4'}; state {gen.state.nbytes / 2**20:.2f} MiB")

resumed = StreamingGenerator.from_state(h, out / "stream.safetensors", prompts, switches=[6], vae=vae)
again = [chunk.latents for chunk in resumed.stream(6)]
print("resumed bit-identically:", all(torch.equal(a, b) for a, b in zip(rest, again)))

# 4. the memory weights alone, to share or to load into another injected copy
memkit.save_memory(model, out / "memory.safetensors")
print(f"memory weights: {(out / 'memory.safetensors').stat().st_size / 1024:.0f} KiB "
      f"(the backbone is not in there); adapters.remove(model) gives the stock model back")
adapters.remove(model)
