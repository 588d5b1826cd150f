"""Models: encoders at several sizes, the loss, KV-cached generation, beam search, and a tiny model
that learns real rendered formulas exactly."""
from pathlib import Path

import pytest
import numpy as np
import torch

from pix2tex.config import load_config
from pix2tex.models import Model, get_model
from pix2tex.models.generate import filter_logits
from pix2tex.models.model import fold_weight_standardization
from pix2tex.models.resnet import sinusoid_2d

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "settings" / "config-tiny.yaml"
PAD, BOS, EOS = 0, 1, 2
XT_PATH = ["decoder_args.rotary_pos_emb=true", "decoder_args.attn_on_attn=false",
           "decoder_args.ff_glu=false"]  # options outside the lean step: x-transformers' cache


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from a second intra-op thread, and with two every op waits at an
    OpenMP barrier for a core that other processes may hold (10x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_cfg(*overrides):
    """config-tiny shrunk further: fast enough to build and run many times in a test."""
    return load_config(TINY, ["num_tokens=40", "max_height=64", "max_width=128", "max_seq_len=48",
                              "dim=64", "num_layers=2", "heads=4", "encoder_heads=4",
                              *overrides])


def small_model(*overrides, seed=0) -> Model:
    torch.manual_seed(seed)
    return get_model(small_cfg(*overrides)).eval()


def random_targets(B, T, V, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    tgt = torch.full((B, T), PAD, dtype=torch.long)
    for i, n in enumerate(lengths):
        tgt[i, 0] = BOS
        tgt[i, 1:n + 1] = torch.randint(3, V, (n,), generator=g)
        tgt[i, n + 1] = EOS
    return tgt


def uncached_greedy(model, images, max_len):
    """Reference decoder: re-run x-transformers' full forward over the whole prefix every step."""
    memory = model.encode(images)
    seq = torch.full((images.shape[0], 1), BOS, dtype=torch.long)
    for _ in range(max_len):
        logits = model.decode_logits(memory, seq)[:, -1]
        logits[:, [PAD, BOS]] = float("-inf")  # generate never emits them
        nxt = logits.argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
    out = seq[:, 1:]
    after = (out == EOS).long().cumsum(1) - (out == EOS).long() > 0
    return out.masked_fill(after, PAD)


def strip(row):
    row = row.tolist()
    return row[:row.index(EOS) + 1] if EOS in row else [t for t in row if t != PAD]


# --- encoders ----------------------------------------------------------------------------------

@pytest.mark.parametrize("structure,extra", [("hybrid", []), ("vit", []), ("resnet", [])])
def test_encoder_shapes_at_several_sizes(structure, extra):
    model = small_model(f"encoder_structure={structure}", *extra)
    for H, W in [(32, 32), (32, 128), (64, 96), (64, 128)]:
        images = torch.randn(2, 1, H, W)
        memory = model.encode(images)
        cells = (H // 16) * (W // 16)
        assert memory.shape == (2, cells + (structure != "resnet"), 64)
        tgt = random_targets(2, 9, 40, [3, 7])
        logits = model.logits(images, tgt[:, :-1])
        assert logits.shape == (2, 8, 40)
        assert model(images, tgt).dim() == 0


def test_images_outside_the_limits_are_refused():
    model = small_model()
    with pytest.raises(ValueError, match="patch_size"):
        model.encode(torch.randn(1, 1, 40, 64))
    with pytest.raises(ValueError, match="max_height"):
        model.encode(torch.randn(1, 1, 80, 64))


def test_vit_positions_are_indexed_by_row_and_column():
    model = small_model("encoder_structure=vit")
    enc = model.encoder
    table = enc.pos_embed[0]
    for h, w in [(2, 3), (4, 8), (1, 5)]:
        out = enc._pos_embed(torch.zeros(1, h, w, 64))[0]
        assert torch.equal(out[0], (enc.cls_token + table[0])[0, 0])
        for r in range(h):
            for c in range(w):
                assert torch.equal(out[1 + r * w + c], table[1 + r * enc.grid_w + c])


def test_resnet_position_code_is_computed_for_the_feature_size():
    code = sinusoid_2d(3, 5, 8)
    assert code.shape == (15, 8)
    # rows share the first half, columns the second half
    assert torch.equal(code.view(3, 5, 8)[:, 0, :4], code.view(3, 5, 8)[:, 4, :4])
    assert torch.equal(code.view(3, 5, 8)[0, :, 4:], code.view(3, 5, 8)[2, :, 4:])
    assert torch.equal(sinusoid_2d(2, 2, 8).view(2, 2, 8), code.view(3, 5, 8)[:2, :2])
    model = small_model("encoder_structure=resnet")
    assert not any(b.numel() > 1000 for b in model.encoder.buffers() if b.dtype.is_floating_point)


def test_folded_weight_standardization_is_the_same_function():
    import copy
    enc = small_model().encoder
    x = torch.randn(2, 1, 64, 128)
    with torch.no_grad():
        ref = enc(x)
        folded = fold_weight_standardization(copy.deepcopy(enc))(x)
    torch.testing.assert_close(folded, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_generation_follows_fused_optimizer_updates(precision):
    """generate() keeps a frozen encoder copy and prepared decoder weights between calls; a fused
    AdamW step changes the weights without bumping their version counters, and both must still be
    rebuilt (stale ones made every validation during training decode with the weights of the
    first one)."""
    model = small_model()
    x = torch.randn(2, 1, 64, 128)
    model.generate(x, max_len=6, precision=precision)  # builds both caches
    opt = torch.optim.AdamW(model.parameters(), lr=5e-2, fused=True)
    model.train()
    model(x, random_targets(2, 8, 40, [5, 6])).backward()
    opt.step()
    model.eval()
    fresh = small_model()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(model.generate(x, max_len=6, min_len=6, precision=precision),
                       fresh.generate(x, max_len=6, min_len=6, precision=precision))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_for_inference(x, "fp32"), model.encode(x),
                                   atol=1e-4, rtol=1e-4)


def test_released_architecture_parameter_count():
    model = get_model(load_config(REPO / "settings" / "config.yaml"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # LaTeX-OCR 0.1.4: encoder 12,855,232 (identical); decoder 12,643,648 there — x-transformers
    # 2.x has no biases in the attention output, layer norms and logits (15,424 fewer).
    assert count(model.encoder) == 12_855_232
    assert count(model.decoder) == 12_628_224


# --- loss --------------------------------------------------------------------------------------

def test_loss_ignores_everything_after_eos():
    model = small_model()
    images = torch.randn(3, 1, 32, 64)
    tgt = random_targets(3, 12, 40, [4, 9, 2])
    with torch.no_grad():
        loss = model(images, tgt)
        changed = tgt.clone()
        for i, n in enumerate([4, 9, 2]):
            changed[i, n + 2:] = torch.randint(3, 40, (12 - n - 2,))
        assert not torch.equal(changed, tgt)
        assert torch.equal(model(images, changed), loss)
        # ... but a token before EOS counts
        changed[0, 2] = (tgt[0, 2] + 1 - 3) % 37 + 3
        assert not torch.equal(model(images, changed), loss)


def test_loss_is_mean_cross_entropy_over_real_tokens():
    model = small_model()
    images = torch.randn(2, 1, 32, 64)
    tgt = random_targets(2, 8, 40, [5, 2])
    with torch.no_grad():
        logp = model.logits(images, tgt[:, :-1]).log_softmax(-1)
        nll = [-logp[i, t, tgt[i, t + 1]] for i, n in enumerate([5, 2]) for t in range(n + 1)]
        torch.testing.assert_close(model(images, tgt), torch.stack(nll).mean())


def test_logits_from_precomputed_memory_and_hidden_states():
    model = small_model()
    images = torch.randn(2, 1, 32, 64)
    tgt = random_targets(2, 8, 40, [5, 2])[:, :-1]
    with torch.no_grad():
        logits, hidden = model.logits(images, tgt, return_hidden=True)
        memory = model.encode(images)
        assert torch.equal(hidden["encoder"], memory)
        assert hidden["decoder"].shape == (2, 7, 64)
        assert torch.equal(model.logits(None, tgt, memory=memory), logits)
        assert torch.equal(model.decode_logits(memory, tgt), logits)


# --- generation --------------------------------------------------------------------------------

@pytest.mark.parametrize("decoder_args", [
    [],  # config-tiny's (LaTeX-OCR's) decoder: the lean KV-cached step
    XT_PATH,  # other options: x-transformers' own cached path
])
def test_kv_cached_generation_matches_uncached(decoder_args):
    model = small_model(*decoder_args)
    assert model.decoder.lean == (not decoder_args)
    images = torch.randn(3, 1, 32, 96)
    with torch.no_grad():
        ref = uncached_greedy(model, images, 20)
    out = model.generate(images, max_len=20, precision="fp32")
    assert torch.equal(out, ref[:, :out.shape[1]])
    assert (ref[:, out.shape[1]:] == PAD).all()


def test_lean_step_logits_match_x_transformers_forward():
    model = small_model()
    images = torch.randn(2, 1, 32, 64)
    tgt = random_targets(2, 10, 40, [6, 8])[:, :-1]
    dec = model.decoder
    with torch.no_grad():
        memory = model.encode(images)
        ref = dec(tgt, memory)
        w = dec._weights("fp32")
        ck, cv = dec.cross_kv(memory, w)
        La, B, H, N, d = ck.shape
        k_buf, v_buf = ck.new_zeros(La, B, H, 16, d), ck.new_zeros(La, B, H, 16, d)
        k_past, v_past = ck.new_zeros(La, B, H, 0, d), ck.new_zeros(La, B, H, 0, d)
        for t in range(tgt.shape[1]):
            a, _, _ = dec.decode_step(tgt[:, t], t, ck, cv, k_buf, v_buf, w, inplace=True)
            b, k_new, v_new = dec.decode_step(tgt[:, t], t, ck, cv, k_past, v_past, w,
                                              inplace=False)
            k_past, v_past = torch.cat([k_past, k_new], 3), torch.cat([v_past, v_new], 3)
            torch.testing.assert_close(a, ref[:, t], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(b, a)


@pytest.mark.parametrize("decoder_args", [[], XT_PATH])
def test_greedy_equals_beam_width_one(decoder_args):
    model = small_model(*decoder_args, seed=3)
    images = torch.randn(4, 1, 32, 64)
    greedy = model.generate(images, max_len=25, precision="fp32")
    for penalty in (0.0, 1.0):
        beam = model.generate(images, max_len=25, beam_width=1, length_penalty=penalty,
                              precision="fp32")
        assert torch.equal(beam, greedy)


def sequence_logprob(model, images, out):
    """Sum of log p of each generated row (up to its EOS) under teacher forcing, and its length."""
    tgt = torch.cat([torch.full((out.shape[0], 1), BOS), out], 1)
    with torch.no_grad():
        logp = model.logits(images, tgt[:, :-1]).log_softmax(-1)
    labels = model.loss_labels(tgt)
    tok = logp.gather(2, labels.clamp(min=0)[:, :, None])[:, :, 0]
    return (tok * (labels >= 0)).sum(1), (labels >= 0).sum(1)


def test_beam_search_is_batched_per_image_and_well_formed():
    model = small_model(seed=4)
    images = torch.randn(3, 1, 32, 64)
    batched = model.generate(images, max_len=15, beam_width=3, precision="fp32")
    for i in range(3):
        single = model.generate(images[i:i + 1], max_len=15, beam_width=3, precision="fp32")
        # a random model's near-uniform outputs have near ties that the batch size's rounding may
        # break either way: the same hypothesis or one of the same score (length-normalized)
        (a, na), (b, nb) = (sequence_logprob(model, images[i:i + 1], o) for o in
                            (batched[i:i + 1], single))
        torch.testing.assert_close(a / na, b / nb, atol=2e-3, rtol=0)
    for row in batched:
        assert BOS not in row.tolist() and PAD not in strip(row)
        assert all(t == PAD for t in row.tolist()[len(strip(row)):])


def test_beam_search_lets_finished_images_leave_without_changing_answers():
    """The shipped reader on real renders of a short formula and two long ones, batched together:
    the short one is done first and leaves the batch (its rows leave the decoder state); every
    image's beam answer and score equal its answer alone (fp32)."""
    from pix2tex.predict import LatexOCR
    from pix2tex.verify import render_candidates

    formulas = [r"E = m c ^ { 2 }",
                r"\int _ { 0 } ^ { \infty } e ^ { - x ^ { 2 } } d x = \frac { \sqrt { \pi } } { 2 }",
                r"\frac { a + b } { c ^ { 2 } } = \sum _ { i = 1 } ^ { n } x _ { i } + \alpha \beta"]
    images = [np.pad(page, 12, constant_values=255) for page in render_candidates(formulas, 110)]
    ocr = LatexOCR(backend="torch", precision="fp32", beam_width=3)
    pages = [ocr.preprocess(image) for image in images]
    together = ocr.read(pages)
    alone = [ocr.read([page])[0] for page in pages]
    assert [r.latex for r in together] == [r.latex for r in alone]
    assert len(together[0].latex.split()) < len(together[1].latex.split()) / 2  # finishes first
    for a, b in zip(together, alone):
        assert abs(a.confidence - b.confidence) < 1e-4


def test_beam_search_finds_higher_scores_than_greedy():
    model = small_model(seed=5)
    images = torch.randn(4, 1, 32, 64)
    greedy = model.generate(images, max_len=12, precision="fp32")
    beam = model.generate(images, max_len=12, beam_width=4, length_penalty=0.0, precision="fp32")
    assert (sequence_logprob(model, images, beam)[0]
            >= sequence_logprob(model, images, greedy)[0] - 1e-4).all()


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    dropped = torch.isinf(filter_logits(logits, top_k=2))
    assert dropped.tolist() == [[False, False, True, True, True]]
    probs = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, ...
    kept = ~torch.isinf(filter_logits(logits, top_p=0.8))
    assert kept.tolist() == [[True, True, False, False, False]] and probs[0] < 0.8
    model = small_model(seed=6)
    images = torch.randn(2, 1, 32, 64)
    greedy = model.generate(images, max_len=10, precision="fp32")
    top1 = model.generate(images, max_len=10, temperature=1.0, top_k=1, precision="fp32")
    assert torch.equal(top1, greedy)
    a = model.generate(images, max_len=10, temperature=1.0, precision="fp32",
                       generator=torch.Generator().manual_seed(0))
    b = model.generate(images, max_len=10, temperature=1.0, precision="fp32",
                       generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_min_len_forces_the_length():
    model = small_model()
    out = model.generate(torch.randn(2, 1, 32, 64), max_len=30, min_len=30, precision="bf16")
    assert out.shape == (2, 30) and not (out == EOS).any()


# --- a tiny model learns real rendered formulas --------------------------------------------------

@pytest.fixture(scope="module")
def overfit(tiny_data):
    """config-tiny trained on 8 real rendered formulas until it reproduces them."""
    from pix2tex.dataset.dataset import Im2LatexDataset
    ds = Im2LatexDataset.load(tiny_data.train_pkl).update(batchsize=4, shuffle=False,
                                                           transform="test",
                                                           keep_smaller_batches=True)
    batches, n = [], 0
    for indices in ds.batch_plan(0):
        if n >= 8:
            break
        batches.append(ds.load_batch(indices[:8 - n]))
        n += len(batches[-1][0])
    cfg = load_config(TINY, [f"num_tokens={len(ds.tokenizer)}", "max_seq_len=64"])
    torch.manual_seed(0)
    model = get_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for step in range(300):  # about 50 steps are needed
        loss = sum(model(images, tgt) for images, tgt in batches) / len(batches)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    model.eval()
    return model, batches, loss.item()


def test_tiny_model_overfits_real_formulas_to_exact_greedy_output(overfit):
    model, batches, loss = overfit
    for images, tgt in batches:
        out = model.generate(images, precision="fp32")
        for row, target in zip(out, tgt):
            assert strip(row) == strip(target[1:]), f"final loss {loss:.4f}"


def test_each_sequence_stops_at_its_own_eos(overfit):
    model, batches, _ = overfit
    images, tgt = max(batches, key=lambda b: len({len(strip(t[1:])) for t in b[1]}))
    lengths = [len(strip(t[1:])) for t in tgt]
    assert len(set(lengths)) > 1, "need targets of different lengths"
    out = model.generate(images, precision="fp32")
    assert out.shape[1] == max(lengths)
    for row, n in zip(out, lengths):
        assert row[n - 1] == EOS and (row[n:] == PAD).all()
    ref = uncached_greedy(model, images, max(lengths) + 2)
    assert torch.equal(out, ref[:, :out.shape[1]])
    assert torch.equal(model.generate(images, beam_width=1, precision="fp32"), out)
    beams = model.generate(images, beam_width=3, precision="fp32")
    for i in range(len(images)):
        single = model.generate(images[i:i + 1], beam_width=3, precision="fp32")
        assert strip(beams[i]) == strip(single[0]) == strip(tgt[i, 1:])


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_reduced_precision_inference_keeps_the_trained_models_output(overfit, precision):
    model, batches, _ = overfit
    for images, _ in batches:
        assert torch.equal(model.generate(images, precision=precision),
                           model.generate(images, precision="fp32"))


def test_hybrid_stem_runs_channels_last_with_the_same_function():
    """The stem's 'same' max pool without its -inf padding copy picks the same windows at every
    size, and the channels-last stem conv (CPU, with the fused-norm kernel) computes the same."""
    from timm.layers import StdConv2dSame
    from timm.layers.pool2d_same import MaxPool2dSame

    from pix2tex.models import fused_norm
    from pix2tex.models.hybrid import MaxPoolSame, StemConv

    for h, w in [(64, 64), (65, 97), (96, 130), (7, 8)]:
        x = torch.randn(2, 3, h, w)
        assert torch.equal(MaxPoolSame(3, 2)(x), MaxPool2dSame(3, 2)(x))
    assert fused_norm.load(), fused_norm._error
    torch.manual_seed(0)
    ours = StemConv(1, 8, kernel_size=7, stride=2)
    timm_conv = StdConv2dSame(1, 8, kernel_size=7, stride=2)
    timm_conv.load_state_dict(ours.state_dict())
    x = torch.randn(2, 1, 37, 50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = ours(x), timm_conv(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("kernel,stride", [(1, 1), (3, 1), (3, 2), (1, 2)])
def test_std_conv_is_timms_weight_standardized_conv(kernel, stride):
    """The layer-norm form of the weight standardization: timm's outputs and gradients."""
    from timm.layers import StdConv2dSame

    from pix2tex.models.hybrid import StdConv

    torch.manual_seed(0)
    ours = StdConv(16, 24, kernel_size=kernel, stride=stride)
    ours.weight.data.mul_(3).add_(0.5)  # filters far from standardized already
    timm_conv = StdConv2dSame(16, 24, kernel_size=kernel, stride=stride)
    timm_conv.load_state_dict(ours.state_dict())
    x = torch.randn(2, 16, 20, 33)
    y, ref = ours(x), timm_conv(x)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)  # float32, another summation order
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(ours.weight.grad, timm_conv.weight.grad, rtol=1e-4, atol=1e-5)


# --- LaTeX-OCR's decoder names -----------------------------------------------------------------

def test_model_decoder_is_latex_ocrs_custom_ar_wrapper_with_the_same_greedy_output(overfit):
    from x_transformers.autoregressive_wrapper import AutoregressiveWrapper

    from pix2tex.models.transformer import CustomARWrapper, top_k
    model, batches, _ = overfit
    assert isinstance(model.decoder, CustomARWrapper)
    assert isinstance(model.decoder, AutoregressiveWrapper)
    images, tgt = max(batches, key=lambda b: len({len(strip(t[1:])) for t in b[1]}))
    memory = model.encode_for_inference(images, "fp32")
    ours = model.generate(memory=memory, precision="fp32")
    start = torch.full((len(images), 1), BOS, dtype=torch.long)
    # LaTeX-OCR's call (Model.generate there), greedy: temperature 0
    out = model.decoder.generate(start, model.max_seq_len, eos_token=EOS, temperature=0.0,
                                 context=memory)
    assert torch.equal(out, ours)
    for row, target in zip(out, tgt):
        assert strip(row) == strip(target[1:])
    # sampling that can only pick the best token (top_k keeps one) is greedy too
    sampled = model.decoder.generate(start, 64, eos_token=EOS, temperature=1.0,
                                     filter_logits_fn=top_k, filter_thres=0.9999, context=memory)
    assert torch.equal(sampled, ours)
    # 1-d start tokens give a 1-d row, as in LaTeX-OCR
    single = model.decoder.generate(start[0], 64, eos_token=EOS, temperature=0.0, context=memory[:1])
    assert single.dim() == 1 and torch.equal(single, ours[0, :len(single)])


def test_a_latex_ocr_built_custom_ar_wrapper_decodes_like_its_uncached_forward():
    from x_transformers import Decoder, TransformerWrapper

    from pix2tex.models.transformer import CustomARWrapper
    torch.manual_seed(0)
    dec = CustomARWrapper(TransformerWrapper(num_tokens=30, max_seq_len=40, attn_layers=Decoder(
        dim=32, depth=2, heads=4, cross_attend=True)), pad_value=PAD).eval()
    memory = torch.randn(3, 12, 32)
    start = torch.tensor([[BOS, 7]] * 3)  # a two-token start: the first fills the cache
    out = dec.generate(start, 10, eos_token=EOS, temperature=0.0, context=memory)
    seq = start.clone()
    with torch.no_grad():
        for _ in range(10):
            logits = dec.net(seq, context=memory)[:, -1]
            logits[:, [PAD, BOS]] = float("-inf")
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    ref = seq[:, 2:]
    after = (ref == EOS).long().cumsum(1) - (ref == EOS).long() > 0
    ref = ref.masked_fill(after, PAD)
    assert torch.equal(out, ref[:, :out.shape[1]]) and (ref[:, out.shape[1]:] == PAD).all()
    with pytest.raises(ValueError, match="context="):
        dec.generate(start, 5)
    with pytest.raises(ValueError, match="padding"):
        dec.generate(start, 5, context=memory, mask=torch.tensor([[True, False]] * 3))
