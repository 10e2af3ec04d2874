"""Hugging Face transformers models, built offline from tiny configs: Llama (rotary embeddings,
grouped-query attention, RMSNorm, SwiGLU) with generate(), BERT and ViT. No group is skipped because
of attention, pruned equals zeroed, the config follows the pruned sizes."""

import copy
import warnings

import pytest
import torch

from prunable import Pruner
from prunable.configs import ConfigWarning, sync_config
from prunable.reasons import SkipKind

from helpers import zero_producers

transformers = pytest.importorskip("transformers")

#: reasons a group could be skipped because of its attention
ATTENTION = {SkipKind.UNSUPPORTED_OP, SkipKind.MIXED, SkipKind.SIZE_ATTRIBUTE, SkipKind.BLOCKS, SkipKind.TRIAL_FAILED}


def _pruner(model, inputs) -> Pruner:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = Pruner(model, inputs, criterion="l1")
    bad = {gid: str(r) for gid, r in pruner.skipped.items() if r.kind in ATTENTION}
    assert not bad, bad
    return pruner


def _group(pruner, label: str):
    return next(g for g in pruner.groups if label in {m.target.label() for m in g.members})


def _llama(**kw):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      eos_token_id=None, **kw)  # no early stop: generate makes 5 tokens
    return transformers.LlamaForCausalLM(config).eval()


def _kill(model, pair: int, units: list[int]) -> None:
    """Make q/k/v dims ``pair`` and ``pair + 4`` of every head and MLP ``units`` of every layer dead."""
    with torch.no_grad():
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for proj, heads in ((attn.q_proj, 4), (attn.k_proj, 2), (attn.v_proj, 2)):
                proj.weight[[h * 8 + d for h in range(heads) for d in (pair, pair + 4)]] = 0
            attn.o_proj.weight[:, [h * 8 + d for h in range(4) for d in (pair, pair + 4)]] = 0
            mlp.gate_proj.weight[units] = 0
            mlp.up_proj.weight[units] = 0
            mlp.down_proj.weight[:, units] = 0


def test_llama_rotary_pairs_prune_with_the_rotary_table():
    """rotate_half pairs dim i with i + head_dim/2: the pair leaves together, in every head of every layer
    (one rotary table), with its inv_freq entry; v/o dims and the SwiGLU MLP prune; pruned equals zeroed."""
    torch.manual_seed(0)
    model = _llama()
    ids = {"input_ids": torch.randint(0, 64, (2, 7))}
    pruner = _pruner(model, ids)
    attn = _group(pruner, "model.rotary_emb.inv_freq")
    labels = {m.target.label() for m in attn.members}
    assert attn.channels == 4 and attn.blocks is None  # 4 pairs, the same in every head
    assert {f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj.out", "k_proj.out", "v_proj.out",
                                                                          "o_proj.in", "head_dim")} <= labels
    plan = {attn.id: [int(torch.randint(0, 4, ()))]}
    for i in (0, 1):  # as many units from each layer: config.intermediate_size can follow
        plan[f"model.layers.{i}.mlp.gate_proj"] = torch.randperm(48)[:12].tolist()
    reference = copy.deepcopy(model)
    zero_producers(reference, pruner, plan)
    pruner.prune(plan)
    layer = model.model.layers[0].self_attn
    assert (layer.q_proj.out_features, layer.k_proj.out_features, layer.head_dim) == (24, 12, 6)
    assert model.model.rotary_emb.inv_freq.shape == (3,)
    assert (model.config.head_dim, model.config.intermediate_size, model.config.num_attention_heads) == (6, 36, 4)
    assert model.model.layers[1].mlp.intermediate_size == 36 and reference.config.head_dim == 8
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, reference(**ids).logits, atol=1e-5, rtol=1e-4)


def test_llama_with_grouped_query_attention_generates_the_same_tokens_after_pruning_dead_channels():
    torch.manual_seed(0)
    model = _llama()
    _kill(model, 2, [3, 17, 40])
    ids = torch.randint(0, 64, (1, 6))
    before = model.generate(ids, max_new_tokens=5, do_sample=False)
    pruner = _pruner(model, {"input_ids": ids})
    attn, scores = _group(pruner, "model.rotary_emb.inv_freq"), pruner.scores()
    plan = {attn.id: scores[attn.id].argsort()[:1].tolist()}
    for i in (0, 1):
        gid = f"model.layers.{i}.mlp.gate_proj"
        plan[gid] = sorted(scores[gid].argsort()[:3].tolist())
    assert plan[attn.id] == [2] and plan["model.layers.1.mlp.gate_proj"] == [3, 17, 40]  # L1: the dead ones
    pruner.prune(plan)
    assert model.model.layers[1].self_attn.k_proj.out_features == 12  # 2 k/v heads of 6 dims: GQA kept
    after = model.generate(ids, max_new_tokens=5, do_sample=False)  # DynamicCache: k/v of head_dim 6
    assert after.shape == (1, 11) and torch.equal(after, before)


def test_config_keeps_what_the_layers_share_and_warns_for_the_rest():
    torch.manual_seed(0)
    model = _llama()
    pruner = _pruner(model, {"input_ids": torch.randint(0, 64, (1, 5))})
    with pytest.warns(ConfigWarning, match="model.layers.0.mlp"):
        pruner.prune({"model.layers.0.mlp.gate_proj": [0, 1]})  # layer 1 keeps 48: no single size
    assert model.config.intermediate_size == 48 and model.model.layers[0].mlp.intermediate_size == 48
    assert sync_config(model) == sorted(f"model.layers.0.mlp.{p}_proj.weight" for p in ("down", "gate", "up"))


def test_bert_attention_and_feed_forward_prune():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=16)
    model = transformers.BertModel(config).eval()
    inputs = {"input_ids": torch.randint(0, 50, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    pruner = _pruner(model, inputs)
    attn, mlp = _group(pruner, "encoder.layer.0.attention.self.query.out"), "encoder.layer.0.intermediate.dense"
    rows = attn.blocks if attn.blocks is not None else torch.arange(attn.channels)[None]
    plan = {attn.id: torch.cat([r[torch.randperm(len(r))[:2]] for r in rows]).tolist(),
            mlp: torch.randperm(48)[:16].tolist()}
    reference = copy.deepcopy(model)
    zero_producers(reference, pruner, plan)
    with pytest.warns(ConfigWarning, match="attention.self"):  # BERT's config has no head size
        pruner.prune(plan)
    self_attn = model.encoder.layer[0].attention.self
    assert (self_attn.attention_head_size, self_attn.num_attention_heads) == (6, 4)  # all_head_size: unused
    assert model.config.intermediate_size == 32 and model.config.hidden_size == 32
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).last_hidden_state, reference(**inputs).last_hidden_state,
                                   atol=1e-5, rtol=1e-4)


def test_vit_for_image_classification_prunes_attention_and_mlp():
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=4, intermediate_size=48, num_labels=5)
    model = transformers.ViTForImageClassification(config).eval()
    inputs = {"pixel_values": torch.randn(2, 3, 16, 16)}
    pruner = _pruner(model, inputs)
    attn = _group(pruner, "vit.layers.0.attention.q_proj.out")
    assert "vit.layers.0.attention.o_proj.in" in {m.target.label() for m in attn.members}
    rows = attn.blocks if attn.blocks is not None else torch.arange(attn.channels)[None]
    plan = {attn.id: torch.cat([r[torch.randperm(len(r))[:2]] for r in rows]).tolist(),
            "vit.layers.0.mlp.fc1": torch.randperm(48)[:16].tolist()}
    reference = copy.deepcopy(model)
    zero_producers(reference, pruner, plan)
    pruner.prune(plan)
    assert model.vit.layers[0].attention.head_dim == 6 and model.config.head_dim == 6
    assert model.config.intermediate_size == 32 and model.config.num_attention_heads == 4
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, atol=1e-5, rtol=1e-4)
