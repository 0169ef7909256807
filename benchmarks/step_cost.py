"""Step time and peak memory of each eraser against a plain forward+backward of the same denoiser, measured in
one run on this machine: on the toy UNet and on a full-size SD 1.5 UNet architecture with random weights.

    python -m benchmarks.step_cost                  # toy and sd15, esd-x esd-u uce hirm advunlearn doco
    python -m benchmarks.step_cost --models toy
    python -m benchmarks.step_cost --models toy --methods coerasing   # its image-conditioned stage-2 step

Each measurement runs in its own process, so peak resident memory (VmHWM on Linux) is that measurement's alone.
Prints ratios: method step time / plain forward+backward time, and the same for peak memory. Every method is timed
at batch 1, as the plain step (DoCo's defaults are 8 prompts a step, 4 on the toy: its step costs about that many
times more).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                 pad_token_id=1, projection_dim=768)


def build_loaded(model: str):
    """The toy pipeline, or an SD 1.5-architecture pipeline with random weights (tiny VAE: it is never run)."""
    from erasers.models import SD, LoadedPipeline, load_pipeline

    if model == "toy":
        return load_pipeline("toy", device="cpu")
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from benchmarks.toycanvas.tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    tokenizer_dir = tempfile.mkdtemp()
    build_clip_tokenizer(tokenizer_dir)
    pipeline = StableDiffusionPipeline(
        vae=AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT)), tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        unet=UNet2DConditionModel(**SD15_UNET), scheduler=DDIMScheduler(beta_schedule="scaled_linear"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return LoadedPipeline(pipeline, SD, "sd15-random", 50, 7.5)


def measure(model: str, method: str, steps: int) -> dict:
    """Seconds per step and peak RSS for `method` ('plain' = forward+backward of the whole denoiser)."""
    from erasers.files import peak_resident_bytes

    loaded = build_loaded(model)
    if method == "plain":
        unet = loaded.denoiser.train()
        latents = torch.randn(loaded.latent_shape(1))
        states = torch.randn(1, 77, loaded.text_encoder.config.hidden_size)
        times = []
        for _ in range(steps + 1):
            started = time.perf_counter()
            unet(latents, torch.tensor([500]), states).sample.pow(2).mean().backward()
            unet.zero_grad(set_to_none=False)
            times.append(time.perf_counter() - started)
        per_step = sum(times[1:]) / steps  # the first step pays one-off allocation
    else:
        import dataclasses

        from erasers.prompts import make_request
        from erasers.registry import build_config, get_method

        # Enough iterations to time `steps` of them; short sampling chains, AdvUnlearn's attack and DoCo's
        # adversarial loss from the start, DoCo's anchor images few and quick (drawn before the timed steps);
        # Co-Erasing: one text step, then the image-conditioned steps it adds to ESD (the ones timed), from two
        # generated images.
        wanted = {"iterations": steps + 1, "ddim_steps": 4, "warmup": 0, "warmup_steps": 0, "batch_size": 1,
                  "anchor_images": 2, "sample_steps": 2, "text_iterations": 1, "image_iterations": steps + 1,
                  "image_count": 2}
        fields = {f.name for f in dataclasses.fields(get_method(method).eraser.config_class)}
        overrides = {key: value for key, value in wanted.items() if key in fields}
        config = build_config(method, model == "toy", overrides)
        eraser = get_method(method).eraser(config)
        request = make_request(["star"], loaded.tokenizer, model == "toy")
        started = time.perf_counter()
        eraser.erase(loaded, request)
        total = time.perf_counter() - started
        history = getattr(eraser, "history", None)
        per_step = ((history[-1]["seconds"] - history[0]["seconds"]) / (history[-1]["step"] - history[0]["step"])
                    if history and len(history) > 1 else total)
    return {"model": model, "method": method, "seconds_per_step": per_step,
            "peak_rss_bytes": peak_resident_bytes()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="toy,sd15")
    parser.add_argument("--methods", default="esd-x,esd-u,uce,hirm,advunlearn,doco")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "METHOD", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], int(args.one[2]))))
        return
    rows = []
    for model in args.models.split(","):
        steps = 20 if model == "toy" else 2
        for method in ["plain", *args.methods.split(",")]:
            out = subprocess.run([sys.executable, "-m", "benchmarks.step_cost", "--one", model, method, str(steps)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{model} {method}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # a long run killed later keeps what it measured
    print("| model | method | s/step | x plain | peak RSS MiB | x plain |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        plain = next(r for r in rows if r["model"] == row["model"] and r["method"] == "plain")
        print(f"| {row['model']} | {row['method']} | {row['seconds_per_step']:.3f} | "
              f"{row['seconds_per_step'] / plain['seconds_per_step']:.2f} | {row['peak_rss_bytes'] / 2**20:.0f} | "
              f"{row['peak_rss_bytes'] / plain['peak_rss_bytes']:.2f} |")
    print("\nUCE has no training steps: its row is the whole closed-form edit.")


if __name__ == "__main__":
    main()
