"""Loss and gradient parity with transformers' `RTDetrForObjectDetectionLoss` (RT-DETRv2 training loss).

Both sides run in float64 (JAX x64, torch `.double()`) so the comparison tests the implementation, not float32
rounding; the Hungarian matching then cannot flip on near-ties. Two settings:
- eval mode (running batch-norm statistics), no denoising: main + auxiliary + encoder-proposal terms;
- train mode (batch statistics in the encoder's batch norms) with denoising, where transformers' own noisy
  queries are recorded and injected into our model, so every `_dn_` term is compared too.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TINY_BASIC, build_reference, tiny_config
from images import synthetic_batch

from rtdetr_jax import RTDetrV2Detector, RTDetrV2ForObjectDetection
from rtdetr_jax.convert.transformers import variables_to_state_dict
from rtdetr_jax.loss.criterion import pad_targets, rtdetr_loss
from rtdetr_jax.modeling import denoising as dn_mod

# transformers 5 saves a few modules under their legacy names (its checkpoint conversion mapping)
SAVED_NAME = {"model.encoder.aifi.0.layers.0.mlp.fc1.weight": "model.encoder.encoder.0.layers.0.fc1.weight"}
GRAD_KEYS = [
    "model.decoder.class_embed.1.weight",
    "model.decoder.bbox_embed.0.layers.2.bias",
    "model.decoder.layers.0.encoder_attn.sampling_offsets.weight",
    "model.decoder.layers.1.self_attn.q_proj.weight",
    "model.enc_score_head.weight",
    "model.enc_bbox_head.layers.0.weight",
    "model.encoder.aifi.0.layers.0.mlp.fc1.weight",
    "model.encoder.fpn_blocks.0.conv1.norm.weight",
    "model.encoder_input_proj.1.0.weight",
    "model.backbone.model.encoder.stages.3.layers.0.layer.1.convolution.weight",
    "model.denoising_class_embed.weight",
]


def make_labels(seed: int, counts=(3, 5), num_classes: int = 5):
    rng = np.random.default_rng(seed)
    labels = []
    for n in counts:
        cxcy = rng.uniform(0.2, 0.8, size=(n, 2))
        wh = rng.uniform(0.05, 0.4, size=(n, 2))
        labels.append({"class_labels": rng.integers(0, num_classes, size=n), "boxes": np.concatenate([cxcy, wh], 1)})
    return labels


def torch_labels(labels):
    return [{"class_labels": torch.as_tensor(t["class_labels"]), "boxes": torch.as_tensor(t["boxes"]).double()}
            for t in labels]


def torch_loss_and_grads(reference, pixel_values, labels, train: bool):
    model = copy.deepcopy(reference).double()
    model.train(train)
    model.zero_grad()
    out = model(pixel_values=torch.from_numpy(pixel_values).double(), labels=torch_labels(labels))
    out.loss.backward()
    params = dict(model.named_parameters())
    grads = {SAVED_NAME.get(k, k): params[k].grad.numpy() for k in GRAD_KEYS if params[k].grad is not None}
    return {k: float(v) for k, v in out.loss_dict.items()}, float(out.loss), grads


def our_loss_and_grads(model, pixel_values, labels, train: bool, denoising=None):
    config = model.config
    with jax.enable_x64(True):
        variables = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), model.variables)
        module = RTDetrV2Detector(config, jnp.float64)
        targets = jax.tree_util.tree_map(jnp.asarray, pad_targets(labels))
        targets = targets.replace(boxes=targets.boxes.astype(jnp.float64))

        def loss_fn(params):
            mutable = ["batch_stats"] if train else False
            out = module.apply({"params": params, "batch_stats": variables["batch_stats"]},
                               jnp.asarray(pixel_values, jnp.float64), denoising, mutable=mutable)
            if train:
                out = out[0]
            return rtdetr_loss(out, targets, config)

        (loss, terms), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
        state = variables_to_state_dict({"params": grads, "batch_stats": variables["batch_stats"]}, config)
        wanted = {SAVED_NAME.get(k, k) for k in GRAD_KEYS}
        flat = {k: v for k, v in state.items() if k in wanted}
        return {k: float(v) for k, v in terms.items()}, float(loss), flat


def assert_terms_close(ours, theirs, tol=1e-4):
    assert set(ours) == set(theirs), f"terms differ: {sorted(set(ours) ^ set(theirs))}"
    diffs = {k: abs(ours[k] - theirs[k]) for k in theirs}
    assert max(diffs.values()) <= tol, f"loss terms differ: {diffs}"


def assert_grads_close(ours, theirs, rel=1e-3):
    assert set(theirs) <= set(ours), f"missing gradients: {sorted(set(theirs) - set(ours))}"
    for k, g in theirs.items():
        scale = np.abs(g).max()
        assert scale > 0, f"{k}: zero reference gradient"
        err = np.abs(ours[k] - g).max() / scale
        assert err <= rel, f"{k}: gradient relative error {err:.2e}"


@pytest.fixture(scope="module")
def reference_and_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loss_ref")
    reference = build_reference(folder, tiny_config(TINY_BASIC, num_denoising=12), seed=5)
    return reference, RTDetrV2ForObjectDetection.from_pretrained(folder)


def test_loss_parity_without_denoising(reference_and_model):
    reference, model = reference_and_model
    pixel_values = synthetic_batch(2, 96, 128, seed=21)
    labels = make_labels(0)
    theirs, their_total, their_grads = torch_loss_and_grads(reference, pixel_values, labels, train=False)
    ours, our_total, our_grads = our_loss_and_grads(model, pixel_values, labels, train=False)
    assert len(theirs) == 3 * (1 + model.config.decoder_layers)  # main, aux per earlier layer, encoder proposals
    assert_terms_close(ours, theirs)
    assert abs(our_total - their_total) <= 1e-4
    their_grads.pop("model.denoising_class_embed.weight", None)  # unused without denoising
    assert_grads_close(our_grads, their_grads)

    # the transformers-style call: model(pixel_values=..., labels=[...]) -> loss, loss_dict (float32)
    out = model(pixel_values=pixel_values, labels=labels)
    assert_terms_close({k: float(v) for k, v in out.loss_dict.items()}, theirs, tol=1e-3)
    assert abs(float(out.loss) - their_total) <= 1e-3
    with pytest.raises(ValueError, match="labels has 1 entries for a batch of 2"):
        model(pixel_values=pixel_values, labels=labels[:1])


@pytest.mark.parametrize("counts", [(3, 5), (0, 2)], ids=["3+5_boxes", "empty_image"])
def test_loss_parity_with_injected_denoising(reference_and_model, monkeypatch, counts):
    """transformers' denoising queries (random) are recorded and fed to our model; train-mode batch norm."""
    from transformers.models.rt_detr_v2 import modeling_rt_detr_v2 as hf

    reference, model = reference_and_model
    config = model.config
    pixel_values = synthetic_batch(2, 96, 128, seed=22)
    labels = make_labels(1, counts)
    recorded = {}
    original = hf.get_contrastive_denoising_training_group

    def recording(*args, class_embed, **kwargs):
        def embed(ids):
            recorded["labels"] = ids.numpy().copy()
            return class_embed(ids)

        result = original(*args, class_embed=embed, **kwargs)
        recorded["boxes_unact"] = result[1].detach().numpy().copy()
        recorded["attn_mask"] = result[2].numpy().copy()
        recorded["meta"] = result[3]
        # transformers builds this mask in float32 even for a float64 model, and torch 2.13's CPU
        # scaled_dot_product_attention returns wrong values for a float32 mask with float64 queries
        return result[0], result[1], result[2].to(torch.float64), result[3]

    monkeypatch.setattr(hf, "get_contrastive_denoising_training_group", recording)
    torch.manual_seed(0)
    theirs, their_total, their_grads = torch_loss_and_grads(reference, pixel_values, labels, train=True)

    # our layout for the same batch: its used part must be transformers' layout exactly
    targets = pad_targets(labels)
    slots = dn_mod.num_denoising_slots(config.num_denoising, targets.max_boxes)
    slot_gt, slot_real, negative, group_id, num_groups, in_use = dn_mod.layout(jnp.asarray(targets.mask), config.num_denoising,
                                                                       slots)
    used = recorded["labels"].shape[1]
    assert int(np.sum(in_use)) == used
    assert int(num_groups) == recorded["meta"]["dn_num_group"]
    mask = np.asarray(dn_mod.attention_mask(group_id, config.num_queries))
    keep = np.r_[np.arange(used), slots + np.arange(config.num_queries)]
    assert np.array_equal(mask[np.ix_(keep, keep)], recorded["attn_mask"] == 0)
    positive = np.asarray(slot_real & ~negative[None])
    for i, idx in enumerate(recorded["meta"]["dn_positive_idx"]):
        assert np.array_equal(np.nonzero(positive[i])[0], idx.numpy())

    pad = slots - used
    labels_in = np.pad(recorded["labels"], ((0, 0), (0, pad)), constant_values=config.num_labels)
    boxes_in = np.pad(recorded["boxes_unact"], ((0, 0), (0, pad), (0, 0)), constant_values=np.log(1e-5))
    with jax.enable_x64(True):
        queries = dn_mod.DenoisingQueries(
            labels=jnp.asarray(labels_in, jnp.int32),
            boxes_unact=jnp.asarray(boxes_in, jnp.float64),
            attention_mask=jnp.asarray(mask),
            slot_gt=slot_gt,
            slot_positive=jnp.asarray(positive),
            slot_in_use=in_use,
            num_groups=num_groups,
        )
        ours, our_total, our_grads = our_loss_and_grads(model, pixel_values, labels, train=True, denoising=queries)
    assert sum(k.endswith(f"_dn_{config.decoder_layers - 1}") for k in theirs) == 3
    assert_terms_close(ours, theirs)
    assert abs(our_total - their_total) <= 1e-4
    assert_grads_close(our_grads, their_grads)
