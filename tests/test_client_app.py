"""The personalised, stateful client: its head kept in a RecordDict across rounds."""

import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict

from pytorch_example.client_app import (
    HEAD_STATE_KEY,
    client_generator,
    model_with_own_head,
    node_setting,
    save_head,
)
from pytorch_example.config import ConfigError
from pytorch_example.task import Net


def test_first_round_uses_the_global_model_unchanged():
    global_model = Net()
    net = model_with_own_head(ArrayRecord(global_model.state_dict()), RecordDict())
    for name, value in global_model.state_dict().items():
        torch.testing.assert_close(net.state_dict()[name], value)


def test_saved_head_replaces_the_global_head_only():
    state = RecordDict()
    trained = Net()
    save_head(trained, state)
    assert HEAD_STATE_KEY in state.array_records

    new_global = Net()
    net = model_with_own_head(ArrayRecord(new_global.state_dict()), state)
    for name, value in net.state_dict().items():
        source = trained if name.startswith("fc2.") else new_global
        torch.testing.assert_close(value, source.state_dict()[name])


def test_saving_again_overwrites_the_head():
    state = RecordDict()
    save_head(Net(), state)
    latest = Net()
    save_head(latest, state)
    restored = state[HEAD_STATE_KEY].to_torch_state_dict()
    torch.testing.assert_close(restored["weight"], latest.fc2.weight.detach())


def test_client_rng_depends_on_seed_round_and_partition():
    draws = {
        key: torch.rand(3, generator=client_generator(*key)).tolist()
        for key in [(42, 1, 0), (42, 1, 1), (42, 2, 0), (7, 1, 0)]
    }
    assert len({tuple(value) for value in draws.values()}) == 4
    assert torch.rand(3, generator=client_generator(42, 1, 0)).tolist() == draws[(42, 1, 0)]


def test_missing_node_config_key_is_one_clear_error():
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 3}, state=RecordDict(), run_config={})
    assert node_setting(context, "partition-id") == 3
    with pytest.raises(ConfigError, match="node config key 'num-partitions' is missing"):
        node_setting(context, "num-partitions")
