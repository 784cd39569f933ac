"""Activation matching on the data transformers users have: dict batches,
``BatchEncoding``, ``(inputs, labels)`` tuples, a ``DataLoader`` over dict
examples, without an ``input_fn``; and the ``use_cache=True`` message.

Every form must give exactly the permutation of an explicit ``input_fn`` (the
same activations), and recover a known permutation of a tiny BERT.
"""

from __future__ import annotations

import copy
from collections import UserDict
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

import maskalign as ma
from maskalign.errors import DOCS_URL, DataError, TraceError

transformers = pytest.importorskip("transformers")

SEQ = 10
VOCAB = 60


def tiny_bert(seed: int) -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=SEQ,
        num_labels=3,
    )
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config).eval()


def tiny_gpt2(seed: int) -> torch.nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=SEQ, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


def dict_batches(n: int = 3, batch: int = 8, seq: int = SEQ, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Padded token batches: every row has its own length, the rest is padding."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(3, seq + 1, (batch,), generator=generator)
        ids = torch.randint(1, VOCAB, (batch, seq), generator=generator)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def positional(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The explicit input_fn: BERT's forward(input_ids, attention_mask, ...)."""
    return batch["input_ids"], batch["attention_mask"]


def match(a: torch.nn.Module, b: torch.nn.Module, data: Any, **kwargs: Any) -> ma.Permutation:
    return ma.match_activations(a, b, data, progress=False, **kwargs)


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    return tiny_bert(0), tiny_bert(1)


@pytest.fixture(scope="module")
def reference(models: tuple[torch.nn.Module, torch.nn.Module]) -> ma.Permutation:
    """The permutation from an explicit positional input_fn (the old way)."""
    a, b = models
    return match(a, b, dict_batches(), input_fn=positional)


def test_reference_is_a_nontrivial_permutation(reference: ma.Permutation) -> None:
    moved = [g for g, idx in reference.items() if not torch.equal(idx, torch.arange(idx.numel()))]
    assert moved, "independent initialisations should not match by the identity"


@pytest.mark.slow
def test_dict_batches_match_like_an_explicit_input_fn(models, reference) -> None:
    a, b = models
    batches = dict_batches()
    before = copy.deepcopy(batches)
    assert match(a, b, batches) == reference
    as_dict = {"input_ids", "attention_mask"}
    assert match(a, b, batches, input_fn=lambda x: {k: v for k, v in x.items() if k in as_dict}) == reference
    for got, want in zip(batches, before):  # the batches are not modified
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_the_attention_mask_is_fed(models, reference) -> None:
    """Without the mask the statistics differ, so dict batches really pass it."""
    a, b = models
    ids_only = match(a, b, dict_batches(), input_fn=lambda x: x["input_ids"])
    assert ids_only.report["groups"] != reference.report["groups"]


def test_batch_encoding_matches_like_an_explicit_input_fn(models, reference) -> None:
    a, b = models
    encodings = [transformers.BatchEncoding(batch) for batch in dict_batches()]
    assert not isinstance(encodings[0], dict)  # a UserDict: a Mapping, not a dict
    assert match(a, b, encodings) == reference


def test_user_dict_batches(models, reference) -> None:
    a, b = models
    assert match(a, b, [UserDict(batch) for batch in dict_batches()]) == reference


@pytest.mark.slow
def test_inputs_labels_tuples(models, reference) -> None:
    a, b = models
    labels = torch.zeros(8, dtype=torch.long)
    # (dict of keyword inputs, labels)
    assert match(a, b, [(batch, labels) for batch in dict_batches()]) == reference
    # (input tensor, labels): the one positional input, like input_fn=lambda b: b[0]
    tuples = [(batch["input_ids"], labels) for batch in dict_batches()]
    ids_only = match(a, b, tuples, input_fn=lambda x: x[0])
    assert match(a, b, tuples) == ids_only
    assert match(a, b, [list(t) for t in tuples]) == ids_only


def test_dataloader_over_dict_examples_with_labels(models, reference) -> None:
    """default_collate stacks dict examples into dict batches; a "labels" key
    is passed on as in model(**batch) (the loss does not change activations)."""
    a, b = models
    examples = [
        {
            "input_ids": batch["input_ids"][i],
            "attention_mask": batch["attention_mask"][i],
            "labels": torch.tensor(i % 3),
        }
        for batch in dict_batches()
        for i in range(8)
    ]
    loader = DataLoader(examples, batch_size=8)
    assert set(next(iter(loader))) == {"input_ids", "attention_mask", "labels"}
    assert match(a, b, loader) == reference


def test_keyword_order_may_change_between_batches(models, reference) -> None:
    a, b = models
    batches = dict_batches()
    batches[1] = {"attention_mask": batches[1]["attention_mask"], "input_ids": batches[1]["input_ids"]}
    assert match(a, b, batches) == reference


@pytest.mark.slow
def test_spec_built_with_kwargs_and_batches_of_other_lengths_recover_a_permutation() -> None:
    a = tiny_bert(2)
    first = dict_batches(seed=3)[0]
    spec = ma.build_spec(a, (), kwargs=first)
    sigma = ma.random_permutation(spec, torch.Generator().manual_seed(4))
    b = ma.apply_permutation(a, sigma)
    batches = dict_batches(n=2, seed=3) + dict_batches(n=1, seq=6, seed=5)  # two sequence lengths
    assert match(a, b, batches, spec=spec) == sigma
    assert match(a, b, batches) == sigma  # spec built from the first batch
    assert match(b, a, batches) == sigma.inverse()


def test_dict_batches_against_a_positional_spec_name_both_structures(models) -> None:
    a, b = models
    batches = dict_batches()
    spec = ma.build_spec(a, (batches[0]["input_ids"],))
    with pytest.raises(DataError) as info:
        match(a, b, batches, spec=spec)
    message = str(info.value)
    assert "keyword inputs ['input_ids', 'attention_mask']" in message and "1 positional input(s)" in message
    assert DOCS_URL in message


@pytest.mark.slow
def test_use_cache_true_says_to_pass_use_cache_false() -> None:
    a, b = tiny_gpt2(0), tiny_gpt2(1)
    assert a.config.use_cache
    batches = [{"input_ids": batch["input_ids"]} for batch in dict_batches(n=2)]
    state = {k: v.clone() for k, v in a.state_dict().items()}
    with pytest.raises(TraceError) as info:
        match(a, b, batches)
    message = str(info.value)
    assert "use_cache=True" in message and "use_cache=False" in message and "model_a" in message
    assert message.endswith(f"{DOCS_URL}/troubleshooting/#traceerror")
    assert a.config.use_cache and all(torch.equal(v, state[k]) for k, v in a.state_dict().items())
    # the two fixes the message names
    with_flag = match(a, b, batches, input_fn=lambda x: {**x, "use_cache": False})
    for model in (a, b):
        model.config.use_cache = False
    assert match(a, b, batches) == with_flag


def test_bert_with_use_cache_true_needs_nothing(models) -> None:
    """An encoder returns no cache: config.use_cache=True is no error."""
    a, _ = models
    assert a.config.use_cache
    match(a, a, dict_batches(n=1))


def test_batches_of_token_lists_name_the_key(models) -> None:
    a, b = models
    batch = dict_batches(n=1)[0]
    listed = {"input_ids": batch["input_ids"].tolist(), "attention_mask": batch["attention_mask"]}
    with pytest.raises(DataError, match=r"Batch 0: 'input_ids' is a list of numbers.*return_tensors='pt'"):
        match(a, b, [listed])
