"""Every eraser on every family (SD, SDXL, Flux), on the tiny random pipelines: the adapter builds the conditioning,
the denoiser call and the training examples exactly as each pipeline does; each method trains a few steps, saves an
edit that loads back onto a fresh pipeline, and the edited pipeline's output for the concept's prompt changes more
than an unrelated prompt's. (Mixed precision and memory: test_precision.py.)"""


import numpy as np
import pytest
import torch
from tiny_pipelines import RESOLUTION, random_ip_adapter_options, set_text_length

from erasers.edits import apply_edits, base_fingerprint, edit_metadata, read_edit, save_edit
from erasers.losses import predict_noise
from erasers.prompts import make_request
from erasers.registry import build_config, families_matrix, get_method
from erasers.run import erase

FAMILIES = ("sd", "sdxl", "flux")

# A few steps each. `bar`: how many times more the concept's output must change than the unrelated prompt's.
# UCE (closed form with a preservation term) and the methods with a retain loss (AdvUnlearn, HiRM) are selective.
# ESD has no preservation term: on these random models, whose outputs barely depend on the text (6-8% between a
# prompt and the empty one) and whose one-word prompts share 7 of 8 text positions (start token and padding, cosine
# 0.96-1.0 between "star" and "dog"), its edit moves every prompt's prediction as much as the concept's (measured on
# one latent for both prompts: 0.95-1.40). Here, each prompt on its own latent, its bar is only that the concept's
# output moves more; test_denoiser_erasers_are_specific_to_prompts_that_tell_apart measures ESD's (and DoCo's,
# Co-Erasing's) selectivity on one latent with prompts that differ at most positions. ESD's selectivity on a trained
# model is the README's IRA/CRA (toy SD).
# Each method's few-step options are its registry entry's `quick`; those with a preservation term (`preserves`: UCE,
# AdvUnlearn, HiRM) are held to a 3x bar. Measured with the quick options: DoCo 2.3x on sd, 1.2-1.6x on sdxl (also
# with preserve_weight 5), 1.8x on flux; Co-Erasing on the text-reading parameters (its toy default; with the
# paper's noxattn an unrelated prompt moved more than the concept here, 0.18 against 0.15 on sd) 1.08x sd, 1.20x
# sdxl, 1.50x flux. A method registered without a preservation term gets the 1x bar.
def method_options(method: str, loaded, root) -> dict:
    """The registry's few-step options, plus the resources the entry says it needs (a random IP-Adapter)."""
    entry = get_method(method)
    options = dict(entry.quick)
    if "ip_adapter" in entry.needs:
        options.update(random_ip_adapter_options(loaded, root / "ip-adapter"))
    return options


def selectivity_bar(method: str) -> float:
    return 3.0 if get_method(method).preserves else 1.0


CONCEPT, UNRELATED = "star", "dog"


def weights_with_gradients(loaded) -> list[str]:
    """The pipeline's parameters that require a gradient or still hold one."""
    return [f"{name}.{key}" for name, component in loaded.pipeline.components.items()
            if isinstance(component, torch.nn.Module)
            for key, parameter in component.named_parameters() if parameter.requires_grad or parameter.grad is not None]


def predictions(loaded, prompts):
    latents = torch.randn(loaded.adapter.latent_shape(len(prompts)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return predict_noise(loaded.denoiser, latents, 500, loaded.encode_text(prompts))


# Every registered method on every family its entry names (the README's families x methods matrix).
@pytest.mark.parametrize(("method", "family"), [(method, family) for method, row in families_matrix().items()
                                                 for family, edits in row.items() if edits])
def test_each_method_erases_on_each_family(bases, tmp_path, family, method):
    loaded = bases(family)
    options, bar = method_options(method, loaded, tmp_path), selectivity_bar(method)
    assert not weights_with_gradients(loaded)  # loaded frozen, as diffusers' training scripts do
    before = predictions(loaded, [CONCEPT, UNRELATED])
    config = build_config(method, False, options)
    request = make_request([CONCEPT], loaded.tokenizer, None, preserve=[UNRELATED, "cat"])
    eraser = get_method(method).eraser(config)
    fingerprint = base_fingerprint(loaded)  # the base as it was before the erase, which may edit it in place
    components = eraser.erase(loaded, request)
    # Nothing keeps a gradient (on SDXL's UNet, gigabytes the evaluation after an erase would carry).
    assert not weights_with_gradients(loaded)
    if hasattr(eraser, "history"):  # a trained method logged finite losses; a closed form (UCE) logs none
        losses = [row[key] for row in eraser.history for key in row if key not in ("step", "seconds")]
        assert losses and all(np.isfinite(losses)), eraser.history
    assert all(torch.isfinite(p).all() for module in components.values() for p in module.parameters())
    saved = save_edit(tmp_path / "edit", components, edit_metadata(loaded, method, config, request, fingerprint))
    assert read_edit(saved)["base_family"] == family

    edited = bases(family)  # a fresh copy of the base, the edit loaded from disk
    apply_edits(edited, [saved])
    if get_method(method).trains:  # a training-free edit leaves the denoiser's predictions; it acts in sampling
        after = predictions(edited, [CONCEPT, UNRELATED])
        change = [float((after[i] - before[i]).norm() / before[i].norm()) for i in range(2)]
        assert change[0] > 1e-3, change
        assert change[0] > bar * change[1], change
    else:
        assert components == {} and read_edit(saved)["components"] == []
    image_size = RESOLUTION[family]
    # SLD's correction scales with how the prompt's prediction differs from the concept's: none for the concept's
    # own text, so a prompt that names it.
    prompt = CONCEPT if get_method(method).trains else f"a {CONCEPT} picture"
    base_image = bases(family).generate([prompt], steps=2, progress=False, height=image_size, width=image_size)[0]
    edited_image = edited.generate([prompt], steps=2, progress=False, height=image_size, width=image_size)[0]
    assert not np.array_equal(np.asarray(base_image), np.asarray(edited_image))


# Selectivity of the erasers that edit the denoiser without preserving the unrelated prompt itself, measured as the
# issue asks: the denoiser's prediction for the concept's and an unrelated prompt on the same latent and timestep,
# before and after the edit. Three-word prompts with no word in common, read as 5 tokens, differ at 3-4 of 5
# positions (one-word prompts at 1 of 8). Measured ratios (sd, sdxl, flux): esd-x 1.81, 2.34, 1.84; esd-te 1.26,
# 1.45, 1.75; DoCo (retaining two other prompts, not the measured one) 3.01, 2.12, 1.85; Co-Erasing 1.77, 2.40,
# 1.89. ESD-u trains what reads the image, not the text: 1.02, 1.04, 1.04, no selectivity to assert (its bar in the
# test above). Neither 32 steps at a quarter of the learning rate, the neutral contrast, nor esd-x's keys and values
# alone (xattn-strict: 1.86 on sd) raised ESD's: with no preservation term, what limits them is what the prompts'
# states share (the start token, the end token's mix). A trained model does not change this: on the toy SD (60
# steps of each toy default erasing the arrow; the arrow's captions against a heart's and a star's, 8 latents x
# timesteps 100-900) esd-x 1.75, esd-te 1.09, esd-u 1.01; on the guided prediction the sampler steps with
# (classifier-free guidance 5) no better: 1.44, 1.10, 0.98.
SELECTIVITY = {"esd-x": 1.5, "esd-te": 1.2, "doco": 1.5, "coerasing": 1.5}
CONCEPT_WORDS, UNRELATED_WORDS = "star circle painting", "dog photo picture"
OTHER_RETAINED = ["cat house drawing", "moon tree sketch"]


def same_latent_predictions(loaded, prompts):
    latents = torch.randn(loaded.adapter.latent_shape(1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return predict_noise(loaded.denoiser, latents.expand(len(prompts), *latents.shape[1:]), 500,
                             loaded.encode_text(prompts))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(SELECTIVITY))
def test_denoiser_erasers_are_specific_to_prompts_that_tell_apart(bases, tmp_path, family, method):
    loaded = bases(family)
    options = method_options(method, loaded, tmp_path)
    set_text_length(loaded, 5)
    prompts = [CONCEPT_WORDS, UNRELATED_WORDS]
    before = same_latent_predictions(loaded, prompts)
    request = make_request([CONCEPT_WORDS], loaded.tokenizer, None, preserve=OTHER_RETAINED)
    get_method(method).eraser(build_config(method, False, options)).erase(loaded, request)
    after = same_latent_predictions(loaded, prompts)
    change = [float((after[i] - before[i]).norm() / before[i].norm()) for i in range(2)]
    assert change[0] > 1e-3 and change[0] > SELECTIVITY[method] * change[1], change


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_conditioning_is_what_the_pipeline_encodes(bases, family):
    loaded = bases(family)
    prompts = ["a star", "a dog image"]
    cond = loaded.encode_text(prompts)
    if family == "sdxl":
        states, _, pooled, _ = loaded.pipeline.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    else:
        states, pooled, _ = loaded.pipeline.encode_prompt(prompts, None, device="cpu", max_sequence_length=8)
    assert torch.allclose(cond.states, states) and torch.allclose(cond.pooled, pooled)
    assert torch.allclose(torch.cat([cond[:1], cond[1:]]), cond) and len(cond[[1]]) == 1


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_unconditional_branch_is_the_pipelines(bases, family):
    """ESD samples x_t and builds its targets from the same unconditional branch the pipeline guides from: the
    encoded "" on SD, zeros on SDXL base (force_zeros_for_empty_prompt), which the encoded "" is not."""
    loaded = bases(family)
    encoded = loaded.pipeline.encode_prompt("a star", device="cpu", num_images_per_prompt=1,
                                            do_classifier_free_guidance=True)
    ours = loaded.adapter.unconditional()
    assert torch.allclose(ours.states, encoded[1])
    if family == "sdxl":
        assert loaded.pipeline.config.force_zeros_for_empty_prompt
        assert torch.allclose(ours.pooled, encoded[3])
        assert not torch.allclose(loaded.encode_text([""]).states, ours.states)


@pytest.mark.parametrize("family", FAMILIES)
def test_prediction_is_the_denoiser_call_the_pipeline_makes(bases, family):
    """The adapter's call (SDXL's added embeddings, Flux's packed latents, ids, timestep scale) reproduces the
    denoiser output the pipeline itself computes in its first step."""
    loaded = bases(family)
    seen = {}

    def capture(module, args, kwargs, output):
        seen.setdefault("call", (args, kwargs, output))

    handle = loaded.denoiser.register_forward_hook(capture, with_kwargs=True)
    loaded.pipeline.set_progress_bar_config(disable=True)
    try:
        loaded.pipeline(prompt=["a star"], num_inference_steps=1, output_type="latent",
                        **loaded.adapter.size(),
                        **({"max_sequence_length": 8} if family == "flux" else {}))
    finally:
        handle.remove()
    args, kwargs, output = seen["call"]
    output = output[0] if isinstance(output, tuple) else output.sample
    if family == "flux":
        latents, timestep = kwargs["hidden_states"], kwargs["timestep"] * 1000
    else:
        latents, timestep = args[0], args[1]
    ours = predict_noise(loaded.denoiser, latents[-1:], timestep, loaded.encode_text(["a star"]))
    assert torch.allclose(ours, output[-1:], atol=1e-5)


@pytest.mark.parametrize("family", ["sd", "sd-v-prediction", "flux"])
def test_the_training_target_at_x_t_implies_its_clean_latent(bases, family):
    """The adapter's forward process (one timestep per example), the target the denoiser is trained to predict
    (noise, v for SD 2.x 768 px models, Flux's velocity) and the clean latent a prediction implies (what DoCo's
    discriminator reads) are consistent: the true target at x_t gives back x_0."""
    from diffusers import DDIMScheduler

    loaded = bases(family.split("-")[0])
    if family == "sd-v-prediction":
        loaded.pipeline.scheduler = DDIMScheduler.from_config(loaded.pipeline.scheduler.config,
                                                              prediction_type="v_prediction")
    adapter = loaded.adapter
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(loaded.adapter.latent_shape(3), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    t = adapter.training_timesteps(3, generator)
    assert len(set(t.tolist())) == 3
    x_t = adapter.add_noise(x0, noise, t)
    target = adapter.prediction_target(x0, noise, t)
    assert torch.allclose(adapter.x0_estimate(x_t, t, target), x0, atol=1e-4)
    assert not torch.allclose(adapter.x0_estimate(x_t, t, noise if family == "flux" else -noise), x0, atol=1e-2)
    if family == "sd":
        assert torch.equal(target, noise)
    elif family == "sd-v-prediction":
        assert torch.allclose(target, loaded.pipeline.scheduler.get_velocity(x0, noise, t))
    else:
        assert torch.equal(target, noise - x0)


def test_flux_packed_latents_are_laid_out_as_their_image_grid(bases):
    """What DoCo's discriminator convolves on Flux: packed 2x2 patches as the grid they tile, patch (i, j) at (i, j)."""
    loaded = bases("flux")
    side, channels = loaded.adapter.latent_size(), loaded.denoiser.config.in_channels // 4
    latents = torch.randn(2, channels, side, side)
    packed = type(loaded.pipeline)._pack_latents(latents, 2, channels, side, side)
    assert packed.shape == loaded.adapter.latent_shape(2) and side >= 4
    grid = loaded.adapter.as_image(packed)
    assert grid.shape == (2, 4 * channels, side // 2, side // 2)
    for i, j in [(0, 0), (0, 1), (1, 0), (side // 2 - 1, side // 2 - 1)]:
        patch = latents[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(2, 4 * channels)
        assert torch.equal(grid[:, :, i, j], patch)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_attack_runs_on_sdxl_and_flux(tiny_pipeline_dirs, tmp_path, family):
    """UnlearnDiffAtk against an edit of each family: targets drawn by the original model, the erased model's
    plain prompt judged, then vocabulary tokens optimised through every text encoder (SDXL: one set for both CLIP
    encoders; Flux: CLIP's and T5's) until the judge accepts (scripted here: the second check succeeds)."""
    from benchmarks.attack import AttackConfig, attack_success_rate

    resolution = RESOLUTION[family]
    edit = erase(str(tiny_pipeline_dirs[family]), "uce", [CONCEPT], tmp_path / "edit", device="cpu",
                 resolution=resolution)
    verdicts = iter([False, False, True])
    result = attack_success_rate(str(tiny_pipeline_dirs[family]), [edit], prompts=["a star"], count=1,
                                 config=AttackConfig(tokens=2, iterations=3, check_every=1),
                                 judge=lambda images, concept: [next(verdicts) for _ in images], device="cpu",
                                 progress=False, resolution=resolution)
    row = result["prompts"][0]
    assert (row["pre_success"], row["attack_success"], row["iterations"]) == (False, True, 2)
    assert result["asr"] == 1.0 and len(row["adversarial_tokens"]) == 2
    assert np.isfinite(row["loss_first"]) and np.isfinite(row["loss_last"])
    by_encoder = row.get("adversarial_tokens_by_encoder")
    assert (by_encoder is None) if family == "sdxl" else (set(by_encoder) == {"text_encoder", "text_encoder_2"})


@pytest.mark.parametrize("family", FAMILIES)
def test_training_timesteps_drawn_on_the_cpu_reach_the_denoisers_device(bases, family):
    """Training timesteps come from a CPU generator while the denoiser may sit on a GPU. The meta device stands in
    for one: diffusers' UNet moves a 0-dim timestep to its device but built the time embedding of a batch of CPU
    timesteps on the CPU (on CUDA, a device mismatch in the attack's and DoCo's examples on SD/SDXL)."""
    loaded = bases(family)
    t = loaded.adapter.training_timesteps(2, torch.Generator().manual_seed(0))
    assert t.device.type == "cpu" and t.shape == (2,)
    cond = loaded.encode_text(["a star", "a dog"]).to("meta")
    latents = torch.zeros(loaded.adapter.latent_shape(2), device="meta")
    prediction = predict_noise(loaded.denoiser.to("meta"), latents, t, cond)
    assert prediction.device.type == "meta" and prediction.shape == latents.shape


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_a_vae_that_must_upcast_encodes_in_fp32(bases, family):
    """SDXL's and Flux's VAEs overflow in fp16 (their configs set force_upcast): the attack's target latents are
    encoded in fp32, outside autocast, as diffusers' img2img pipelines do, and the VAE is left in fp16."""
    loaded = bases(family)
    vae = loaded.pipeline.vae.to(torch.float16)
    assert vae.config.force_upcast
    seen = []
    vae.encoder.conv_in.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    with torch.autocast("cpu", dtype=torch.float16):
        latents = loaded.adapter.encode_image(image)
    assert seen == [torch.float32] and vae.dtype == torch.float16
    assert latents.dtype == torch.float16 and torch.isfinite(latents).all()
