"""diffusers' equivalents of bench_train.py and bench_sample.py, for ratios measured side by side
(scripts/gpu_check.sh runs both in one call).

    python scripts/bench_diffusers.py train [--size 512] [--grad_ckpt] [--text_encoder]
    python scripts/bench_diffusers.py sample [--size 512] [--batch 1 4] [--steps 50]
    (--tiny: small models, for the CPU smoke test; --device cpu|cuda)

`train` is the step of diffusers' examples/dreambooth/train_dreambooth.py with prior preservation
at batch 1 + 1: the VAE encodes and the text encoder encodes every step, noise and timesteps are
drawn, the UNet predicts, the loss is instance + prior MSE, then backward, clip to 1.0, AdamW
(torch's default, foreach) and the scheduler; bf16 autocast with the frozen VAE and text encoder
held in bf16, as accelerate's mixed precision does (accelerate itself adds nothing on one GPU).
`sample` is StableDiffusionPipeline with DDIM and guidance 7.5 in fp16, given the prompt
embeddings (no tokenizer files offline; their encoding is one small forward). Both use random
SD v1 weights, built on the device. Rows have bench_train.py's and bench_sample.py's columns.
"""

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from ldm.train.logger import peak_memory_gb, reset_peak_memory

TRAIN_HEADER = (
    "| config | size | batch | precision | trains | switches | s/step | images/s | peak GiB |\n"
    "|---|---|---|---|---|---|---|---|---|"
)
SAMPLE_HEADER = (
    "| device | config | H x W | batch | steps | precision | compile | capture | DDIM steps/s "
    "| s/image | peak GiB |\n|---|---|---|---|---|---|---|---|---|---|---|"
)
BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def sd_v1(tiny: bool) -> dict:
    """Constructor arguments of SD v1's UNet, VAE and CLIP text tower (or tiny ones)."""
    if tiny:
        return dict(
            unet=dict(
                block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            ),
            vae=dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1),
            text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, projection_dim=32),
        )  # fmt: skip
    return dict(
        unet=dict(
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        ),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, projection_dim=768),
    )  # fmt: skip


def build(opt):
    """(unet, vae, text_encoder), random weights, made on the device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    parts = sd_v1(opt.tiny)
    four = ("DownEncoderBlock2D",) * 4, ("UpDecoderBlock2D",) * 4
    with torch.device(opt.device):
        unet = UNet2DConditionModel(sample_size=opt.size // 8, **parts["unet"])
        vae = AutoencoderKL(
            down_block_types=four[0], up_block_types=four[1], latent_channels=4, **parts["vae"]
        )
        text = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
                **parts["text"],
            )
        )  # fmt: skip
    return unet, vae, text


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(opt) -> str:
    """train_dreambooth.py's step, timed; returns the table."""
    from diffusers import DDPMScheduler

    device = torch.device(opt.device)
    unet, vae, text = build(opt)
    dtype = torch.bfloat16 if opt.precision == "bf16" else torch.float32
    vae.requires_grad_(False).to(dtype)
    params = list(unet.parameters())
    if opt.text_encoder:
        params += list(text.parameters())
    else:
        text.requires_grad_(False).to(dtype)
    if opt.grad_ckpt:
        unet.enable_gradient_checkpointing()
        if opt.text_encoder:
            text.gradient_checkpointing_enable()
    unet.train()
    text.train(opt.text_encoder)
    scheduler = DDPMScheduler(num_train_timesteps=1000, **BETAS)
    optimizer = torch.optim.AdamW(params, lr=5e-6, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    pixels = torch.randn(2, 3, opt.size, opt.size, device=device)  # instance + class
    ids = torch.randint(0, 49408, (2, 77), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            latents = vae.encode(pixels.to(dtype)).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (2,), device=device)
            noisy = scheduler.add_noise(latents, noise, t)
            context = text(ids)[0]
            pred = unet(noisy, t, context, return_dict=False)[0]
            instance, prior = pred.float().chunk(2)
            target, target_prior = noise.float().chunk(2)
            loss = F.mse_loss(instance, target) + F.mse_loss(prior, target_prior)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(opt.warmup):
        step()
    synchronize(device)
    reset_peak_memory(device)
    start = time.perf_counter()
    for _ in range(opt.steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / opt.steps
    trains = "unet+text" if opt.text_encoder else "unet"
    switches = ", ".join(["VAE and text encoder every step"] + ["grad_ckpt"] * opt.grad_ckpt)
    return (
        f"{TRAIN_HEADER}\n| diffusers | {opt.size} | 1+1 | {opt.precision} | {trains} | "
        f"{switches} | {seconds:.3f} | {2 / seconds:.2f} | {peak_memory_gb(device):.2f} |"
    )


def sample(opt) -> str:
    """StableDiffusionPipeline, timed at each batch; returns the table."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    device = torch.device(opt.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    unet, vae, text = build(opt)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        **BETAS,
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=None, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).to(device, dtype)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    rows = [SAMPLE_HEADER]
    for batch in opt.batch:
        with torch.no_grad():
            embeddings = text(torch.randint(0, 49408, (2 * batch, 77), device=device))[0]
        negative, positive = embeddings.chunk(2)
        times, rates = [], []
        for run in range(opt.runs + 1):
            if run == 1:
                reset_peak_memory(device)
            marks = {}

            def timer(pipeline, i, t, kwargs, marks=marks):
                if i in (0, opt.steps - 1):
                    synchronize(device)
                    marks[i] = time.perf_counter()
                return kwargs

            start = time.perf_counter()
            pipe(
                prompt_embeds=positive, negative_prompt_embeds=negative, height=opt.size,
                width=opt.size, num_inference_steps=opt.steps, guidance_scale=7.5,
                output_type="pt", callback_on_step_end=timer,
            ).images.cpu()  # fmt: skip
            if run > 0:
                times.append(time.perf_counter() - start)
                rates.append((opt.steps - 1) / (marks[opt.steps - 1] - marks[0]))
        rows.append(
            f"| {device.type} | diffusers | {opt.size} x {opt.size} | {batch} | {opt.steps} | "
            f"{str(dtype).split('.')[-1]} | no | no | {statistics.median(rates):.2f} | "
            f"{statistics.median(times) / batch:.3f} | {peak_memory_gb(device):.2f} |"
        )
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["train", "sample"])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="small models (CPU smoke test)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "32"], help="train only")
    p.add_argument("--grad_ckpt", action="store_true", help="train: gradient checkpointing")
    p.add_argument("--text_encoder", action="store_true", help="train: the text encoder too")
    p.add_argument("--steps", type=int, default=None, help="timed train steps / DDIM steps")
    p.add_argument("--warmup", type=int, default=2, help="train: untimed steps first")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="sample: images per call")
    p.add_argument("--runs", type=int, default=2, help="sample: timed runs after a warm-up")
    opt = p.parse_args(argv)
    opt.steps = opt.steps or (5 if opt.what == "train" else 50)
    if opt.steps < (1 if opt.what == "train" else 2):
        p.error("--steps: at least 1 train step, or 2 DDIM steps (timed from the end of the first)")
    return opt


def main(argv: list[str] | None = None) -> int:
    opt = parse_args(argv)
    try:
        import diffusers  # noqa: F401
    except ImportError as e:
        print(f"bench_diffusers.py: diffusers is not installed ({e})", file=sys.stderr)
        return 1
    print(train(opt) if opt.what == "train" else sample(opt), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
