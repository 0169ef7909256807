"""Every eraser on every family (SD, SDXL, Flux), on the tiny random pipelines: the adapter builds the conditioning
and the denoiser call exactly as each pipeline does; each method trains a few steps, saves an edit that loads back
onto a fresh pipeline, and the edited pipeline's output for the concept's prompt changes more than an unrelated
prompt's. Also the mixed-precision and memory options (bf16 frozen weights, fp32 trained parameters)."""

import copy
import sys

import numpy as np
import pytest
import torch

from erasers import UsageError, load_pipeline
from erasers.edits import apply_edits, read_edit, save_edit
from erasers.losses import predict_noise
from erasers.precision import TrainingOptions
from erasers.prompts import make_request
from erasers.registry import build_config, get_method
from erasers.run import erase

FAMILIES = ("sd", "sdxl", "flux")
RESOLUTION = {"sd": None, "sdxl": None, "flux": 16}  # Flux's native 1024 px is 4,096 latent tokens: too many here

# A few steps each. `bar`: how many times more the concept's output must change than the unrelated prompt's.
# UCE (closed form with a preservation term) and the methods with a retain loss (AdvUnlearn, HiRM) are selective.
# ESD has no preservation term: on these random models, whose outputs barely depend on the text (6-8% between a
# prompt and the empty one) and whose one-word prompts share 7 of 8 text positions (start token and padding, cosine
# 0.96-1.0 between "star" and "dog"), its edit moves every prompt's prediction as much as the concept's (measured on
# one latent for both prompts: 0.95-1.40). Here, each prompt on its own latent, its bar is only that the concept's
# output moves more; test_esd_is_specific_to_prompts_that_tell_apart measures ESD's selectivity on one latent with
# prompts that differ at most positions. ESD's selectivity on a trained model is the README's IRA/CRA (toy SD).
METHODS = {
    "esd-x": ({"iterations": 8, "ddim_steps": 4, "lr": 1e-3}, 1.0),
    "esd-u": ({"iterations": 8, "ddim_steps": 4, "lr": 3e-4}, 1.0),
    "esd-te": ({"iterations": 8, "ddim_steps": 4, "lr": 1e-3}, 1.0),
    "uce": ({}, 3.0),
    "advunlearn": ({"iterations": 8, "warmup": 4, "attack_steps": 2, "ddim_steps": 4, "retain_batch": 2, "lr": 1e-3,
                    "layers": "all", "retain_weight": 3.0}, 3.0),
    "hirm": ({"iterations": 12, "lr": 3e-3, "retain_weight": 3.0}, 3.0),
    # DoCo's preservation (surgery, preserve_weight, the test's retain prompts) does not make it selective here
    # either: the same one-word prompts sharing 7 of 8 positions; measured 2.3x on sd, 1.2-1.6x on sdxl (also with
    # preserve_weight 5), 1.8x on flux.
    "doco": ({"iterations": 8, "warmup_steps": 2, "batch_size": 2, "anchor_images": 3, "sample_steps": 2, "lr": 1e-3,
              "preserve_weight": 1.0}, 1.0),
}
CONCEPT, UNRELATED = "star", "dog"


def text_sensitive(loaded, length: int = 8):
    """Random text encoders map every prompt to nearly the same states (tiny token embeddings, mostly padding), so
    the denoisers barely read the text; token embeddings of unit scale and 8-token prompts make the prompts tell
    apart, as a trained encoder's do."""
    torch.manual_seed(0)
    set_text_length(loaded, length)
    with torch.no_grad():
        for encoder in loaded.text_encoders.values():
            encoder.get_input_embeddings().weight.normal_(0, 1)
    return loaded


def set_text_length(loaded, length: int):
    """Every text encoder reads `length` tokens (start and end tokens included)."""
    for tokenizer in loaded.tokenizers.values():
        tokenizer.model_max_length = length
    loaded.adapter.T5_LENGTH = length
    if hasattr(loaded.pipeline, "tokenizer_max_length"):  # Flux reads CLIP's length once, at construction
        loaded.pipeline.tokenizer_max_length = length


@pytest.fixture(scope="module")
def bases(tiny_pipeline_dirs):
    cache = {}

    def get(family):
        if family not in cache:
            loaded = load_pipeline(str(tiny_pipeline_dirs[family]), device="cpu")
            loaded.resolution = RESOLUTION[family]
            cache[family] = text_sensitive(loaded)
        return copy.deepcopy(cache[family])

    return get


def predictions(loaded, prompts):
    latents = torch.randn(loaded.latent_shape(len(prompts)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return predict_noise(loaded.denoiser, latents, 500, loaded.encode_text(prompts))


# The families a method does not edit (its eraser's `families`; each has a refusal test) are not generated.
@pytest.mark.parametrize(("method", "family"), [(method, family) for method in METHODS for family in FAMILIES
                                                 if family in get_method(method).eraser.families])
def test_each_method_erases_on_each_family(bases, tmp_path, family, method):
    options, bar = METHODS[method]
    loaded = bases(family)
    before = predictions(loaded, [CONCEPT, UNRELATED])
    config = build_config(method, False, options)
    request = make_request([CONCEPT], loaded.tokenizer, False, preserve=[UNRELATED, "cat"])
    eraser = get_method(method).eraser(config)
    components = eraser.erase(loaded, request)
    losses = [row[key] for row in getattr(eraser, "history", []) for key in row if key not in ("step", "seconds")]
    assert all(np.isfinite(losses))
    saved = save_edit(tmp_path / "edit", components, loaded, method, config, request, "test", 0.0, None)
    assert read_edit(saved)["base_family"] == family

    edited = bases(family)  # a fresh copy of the base, the edit loaded from disk
    apply_edits(edited, [saved])
    after = predictions(edited, [CONCEPT, UNRELATED])
    change = [float((after[i] - before[i]).norm() / before[i].norm()) for i in range(2)]
    assert change[0] > 1e-3, change
    assert change[0] > bar * change[1], change
    image_size = RESOLUTION[family]
    base_image = bases(family).generate([CONCEPT], steps=2, progress=False, height=image_size, width=image_size)[0]
    edited_image = edited.generate([CONCEPT], steps=2, progress=False, height=image_size, width=image_size)[0]
    assert not np.array_equal(np.asarray(base_image), np.asarray(edited_image))


# ESD's selectivity, measured as the issue asks: the denoiser's prediction for the concept's and an unrelated
# prompt on the same latent and timestep, before and after the edit. Three-word prompts with no word in common, read
# as 5 tokens, differ at 3-4 of 5 positions (one-word prompts at 1 of 8). Measured ratios (sd, sdxl, flux):
# esd-x 1.81, 2.10, 1.84; esd-te 1.26, 1.45, 1.75. ESD-u trains what reads the image, not the text: 1.02, 1.04,
# 1.04, no selectivity to assert (its bar in the test above). Neither 32 steps at a quarter of the learning rate,
# the neutral contrast, nor esd-x's keys and values alone (xattn-strict: 1.86 on sd) raised them: with no
# preservation term, what limits them is what the prompts' states share (the start token, the end token's mix).
# A trained model does not change this: on the toy SD (60 steps of each toy default erasing the arrow; the arrow's
# captions against a heart's and a star's, 8 latents x timesteps 100-900) esd-x 1.75, esd-te 1.09, esd-u 1.01;
# on the guided prediction the sampler steps with (classifier-free guidance 5) no better: 1.44, 1.10, 0.98.
ESD_SELECTIVITY = {"esd-x": 1.5, "esd-te": 1.2}
CONCEPT_WORDS, UNRELATED_WORDS = "star circle painting", "dog photo picture"


def same_latent_predictions(loaded, prompts):
    latents = torch.randn(loaded.latent_shape(1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return predict_noise(loaded.denoiser, latents.expand(len(prompts), *latents.shape[1:]), 500,
                             loaded.encode_text(prompts))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(ESD_SELECTIVITY))
def test_esd_is_specific_to_prompts_that_tell_apart(bases, family, method):
    loaded = bases(family)
    set_text_length(loaded, 5)
    prompts = [CONCEPT_WORDS, UNRELATED_WORDS]
    before = same_latent_predictions(loaded, prompts)
    config = build_config(method, False, METHODS[method][0])
    get_method(method).eraser(config).erase(loaded, make_request([CONCEPT_WORDS], loaded.tokenizer, False))
    after = same_latent_predictions(loaded, prompts)
    change = [float((after[i] - before[i]).norm() / before[i].norm()) for i in range(2)]
    assert change[0] > 1e-3 and change[0] > ESD_SELECTIVITY[method] * change[1], change


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
    x0 = torch.randn(loaded.latent_shape(3), generator=generator)
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
    assert packed.shape == loaded.latent_shape(2) and side >= 4
    grid = loaded.adapter.as_image(packed)
    assert grid.shape == (2, 4 * channels, side // 2, side // 2)
    for i, j in [(0, 0), (0, 1), (1, 0), (side // 2 - 1, side // 2 - 1)]:
        patch = latents[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(2, 4 * channels)
        assert torch.equal(grid[:, :, i, j], patch)


def test_bf16_frozen_weights_train_fp32_parameters(bases):
    """Mixed precision on the tiny SD pipeline: frozen weights in bf16, trained parameters in fp32 after the steps,
    moved, finite losses; the saved component is float32 and loads back."""
    loaded = bases("sd")
    loaded.pipeline.to(dtype=torch.bfloat16)
    loaded.training = TrainingOptions("bf16")
    from erasers.esd import trainable_parameters

    trained_names = {id(p) for p in trainable_parameters(loaded, "xattn")}
    start = {name: p.detach().float().clone() for name, p in loaded.denoiser.named_parameters()
             if id(p) in trained_names}
    eraser = get_method("esd-x").eraser(build_config("esd-x", False, {"iterations": 3, "ddim_steps": 4, "lr": 1e-3}))
    with loaded.autocast():
        unet = eraser.erase(loaded, make_request([CONCEPT], loaded.tokenizer, False))["unet"]
    assert all(np.isfinite(row["loss"]) for row in eraser.history)
    assert unet.dtype == torch.float32, "the edit is saved in float32"
    moved = [name for name, p in unet.named_parameters() if name in start and not torch.equal(p, start[name])]
    assert moved and len(moved) == len(start)
    assert loaded.text_encoder.dtype == torch.bfloat16, "frozen components stay in half precision"


def test_trained_parameters_stay_fp32_through_the_optimiser_steps(bases):
    loaded = bases("sd")
    loaded.pipeline.to(dtype=torch.bfloat16)
    loaded.training = TrainingOptions("bf16")
    parameters = loaded.make_trainable(list(loaded.denoiser.conv_in.parameters()), loaded.denoiser)
    optimizer = loaded.optimizer(parameters, 1e-2)
    latents = torch.randn(loaded.latent_shape(1))
    for _ in range(2):
        with loaded.autocast():
            loss = predict_noise(loaded.denoiser, latents, 10, loaded.encode_text(["a star"])).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.dtype == torch.float32 and p.grad is None for p in parameters)
    assert loaded.denoiser.conv_out.weight.dtype == torch.bfloat16
    with pytest.raises(UsageError, match="not float32"):
        loaded.optimizer([loaded.denoiser.conv_out.weight], 1e-2)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_frozen_teacher_is_the_untrained_denoiser_without_a_second_copy(bases, family, precision):
    """The teacher ESD, DoCo and Co-Erasing read is the denoiser itself with its trained parameters' original values
    swapped in: it predicts what the untrained denoiser did after the student has moved, and it keeps only the
    trained tensors (a fraction of the denoiser, in the frozen weights' dtype), leaving the module's mode and gradients
    as they were."""
    from erasers.esd import trainable_parameters
    from erasers.losses import FrozenOriginal

    loaded = bases(family)
    if precision == "bf16":
        loaded.pipeline.to(dtype=torch.bfloat16)
    loaded.training = TrainingOptions(precision)
    denoiser = loaded.denoiser
    parameters = loaded.make_trainable(trainable_parameters(loaded, "xattn"), denoiser)
    teacher = FrozenOriginal(denoiser, parameters)
    latents = torch.randn(loaded.latent_shape(2), generator=torch.Generator().manual_seed(0)).to(denoiser.dtype)
    cond = loaded.encode_text([CONCEPT, UNRELATED])
    with torch.no_grad(), loaded.autocast():
        untrained = predict_noise(denoiser, latents, 500, cond)
        for parameter in parameters:  # what training does to the student
            parameter.add_(torch.randn_like(parameter))
        moved = predict_noise(denoiser, latents, 500, cond)
    denoiser.train()
    frozen_block = next(m for m in denoiser.modules() if m is not denoiser)
    frozen_block.eval()  # modes are the caller's: the teacher leaves a mixed one as it found it
    with loaded.autocast():
        taught = predict_noise(teacher, latents, 500, cond)
    assert not torch.allclose(moved, untrained)
    assert torch.equal(taught, untrained) and not taught.requires_grad
    assert denoiser.training and not frozen_block.training and all(p.requires_grad for p in parameters)
    kept = sum(t.numel() for t in teacher.originals.values())
    assert kept == sum(p.numel() for p in parameters) < sum(p.numel() for p in denoiser.parameters()) / 2
    # kept in the frozen weights' dtype (exact: the fp32 trained parameters were upcast from it)
    trained_ids = {id(p) for p in parameters}
    frozen_dtype = next(p.dtype for p in denoiser.parameters() if id(p) not in trained_ids)
    assert all(t.dtype == frozen_dtype for t in teacher.originals.values())


def test_each_optimiser_step_reaches_the_next_forward_under_the_erase_autocast(bases):
    """An erase runs its whole loop inside one `loaded.autocast()`: the half-precision copies autocast makes of the
    float32 trained parameters must not be cached across steps, or every forward reads the weights of step 0."""
    loaded = bases("sd")
    loaded.pipeline.to(dtype=torch.bfloat16)
    loaded.training = TrainingOptions("bf16")
    parameters = loaded.make_trainable(list(loaded.denoiser.conv_in.parameters()), loaded.denoiser)
    optimizer = loaded.optimizer(parameters, 1e-1)
    latents = torch.randn(loaded.latent_shape(1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = loaded.encode_text(["a star"])
    losses = []
    with loaded.autocast():
        for _ in range(3):
            loss = predict_noise(loaded.denoiser, latents, 10, cond).float().pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    assert losses[2] < losses[1] < losses[0], losses


def test_gradient_checkpointing_gives_the_same_gradients(bases):
    grads = []
    for checkpointing in (False, True):
        loaded = bases("sdxl")
        loaded.training = TrainingOptions("fp32", gradient_checkpointing=checkpointing)
        from erasers.esd import trainable_parameters

        parameters = loaded.make_trainable(trainable_parameters(loaded, "xattn"), loaded.denoiser)
        loaded.denoiser.train()
        latents = torch.randn(loaded.latent_shape(1), generator=torch.Generator().manual_seed(0))
        predict_noise(loaded.denoiser, latents, 10, loaded.encode_text(["a star"])).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in parameters]))
        assert loaded.denoiser.is_gradient_checkpointing == checkpointing
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_precision_options_are_checked(tiny_pipeline_dirs, tmp_path, monkeypatch):
    sd = str(tiny_pipeline_dirs["sd"])
    with pytest.raises(UsageError, match="fp16 needs a CUDA GPU"):
        erase(sd, "esd-x", [CONCEPT], tmp_path / "a", device="cpu", precision="fp16")
    with pytest.raises(UsageError, match="--precision must be one of"):
        TrainingOptions("int8")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # importing it now fails, as when it is not installed
    with pytest.raises(UsageError, match="needs bitsandbytes"):
        erase(sd, "esd-x", [CONCEPT], tmp_path / "b", options={"iterations": "1", "ddim_steps": "4"}, device="cpu",
              optimizer="adam8bit")
    with pytest.raises(UsageError, match="multiple of 16"):
        erase(sd, "esd-x", [CONCEPT], tmp_path / "c", device="cpu", resolution=20)


def test_erase_in_bf16_saves_an_fp32_edit_with_its_training_options(tiny_pipeline_dirs, tmp_path):
    out = erase(str(tiny_pipeline_dirs["sdxl"]), "esd-x", [CONCEPT], tmp_path / "edit",
                options={"iterations": "2", "ddim_steps": "4"}, device="cpu", precision="bf16",
                gradient_checkpointing=True)
    meta = read_edit(out)
    assert meta["training"] == {"precision": "bf16", "gradient_checkpointing": True, "optimizer": "adam"}
    loaded = load_pipeline(str(tiny_pipeline_dirs["sdxl"]), device="cpu")
    unet = type(loaded.denoiser).from_pretrained(out / "unet")
    assert unet.dtype == torch.float32
    apply_edits(loaded, [out])
    assert loaded.generate([CONCEPT], steps=2, progress=False)[0].size == (16, 16)


def test_gpu_check_runs_every_method_on_the_tiny_pipelines(capsys):
    """benchmarks/gpu_check.py's CPU mode: finite losses and moved parameters for each method x family, and the
    table of seconds per step against the plain forward+backward. (Its CUDA run needs a GPU.)"""
    from benchmarks.gpu_check import main

    code = main(["--tiny", "--steps", "1", "--families", "flux", "--methods", "esd-te,uce"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = [line for line in out.splitlines() if line.startswith("| flux")]
    assert len(rows) == 3 and all(line.endswith("| yes | yes |") for line in rows), out


def test_gpu_check_runs_doco_and_coerasing_where_they_apply(capsys):
    """DoCo and Co-Erasing in the GPU check: Co-Erasing with a random IP-Adapter (published layout) and refinement
    CLIP written for each family's UNet; the families the matrix marks as not applying are skipped, not failed, and
    a family none of the asked methods applies to gets no plain row."""
    from benchmarks.gpu_check import main

    code = main(["--tiny", "--steps", "1", "--families", "sd15,sdxl,flux", "--methods", "doco,coerasing"])
    captured = capsys.readouterr()
    assert code == 0, captured.out
    rows = [line for line in captured.out.splitlines() if line.startswith(("| sd15", "| sdxl", "| flux"))]
    assert [line.split("|")[1:3] for line in rows] == [[" sd15 ", " plain "], [" sd15 ", " doco "],
                                                       [" sd15 ", " coerasing "], [" sdxl ", " plain "],
                                                       [" sdxl ", " doco "], [" sdxl ", " coerasing "],
                                                       [" flux ", " plain "], [" flux ", " doco "]], rows
    assert all(line.endswith("| yes | yes |") for line in rows), captured.out
    assert "flux/coerasing: does not apply" in captured.err

    code = main(["--tiny", "--steps", "1", "--families", "flux", "--methods", "coerasing"])
    captured = capsys.readouterr()
    assert code == 0 and not [line for line in captured.out.splitlines() if line.startswith("| flux")], captured.out
    assert "flux/coerasing: does not apply" in captured.err


def test_step_cost_runs_sdxl_with_gradient_checkpointing(tiny_pipeline_dirs, monkeypatch):
    """benchmarks/step_cost.py's SDXL rows (the tiny SDXL pipeline standing in for the full architecture, at its
    own 32 px rather than 512): the plain step encodes the prompt, lets the text encoders go and steps the UNet
    with gradient checkpointing, as the method steps do."""
    import benchmarks.architectures
    from benchmarks import step_cost

    monkeypatch.setattr(benchmarks.architectures, "build_architecture",
                        lambda family: load_pipeline(str(tiny_pipeline_dirs[family]), device="cpu").pipeline)
    monkeypatch.setitem(step_cost.SETTINGS, "sdxl", (32, True))
    loaded = step_cost.build_loaded("sdxl")
    pixels = [side * loaded.pipeline.vae_scale_factor for side in loaded.latent_shape(1)[-2:]]
    assert loaded.training.gradient_checkpointing and pixels == [32, 32]
    for method in ("plain", "esd-x"):
        row = step_cost.measure("sdxl", method, 1)
        assert row["seconds_per_step"] > 0 and row["peak_rss_bytes"] > 0, row


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_attack_runs_on_sdxl_and_flux(tiny_pipeline_dirs, tmp_path, family):
    """UnlearnDiffAtk against an edit of each family: targets drawn by the original model, the erased model's
    plain prompt judged, then vocabulary tokens optimised through every text encoder (SDXL: one set for both CLIP
    encoders; Flux: CLIP's and T5's) until the judge accepts (scripted here: the second check succeeds)."""
    from erasers.attack import AttackConfig, attack_success_rate

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
