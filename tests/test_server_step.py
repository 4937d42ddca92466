"""The server's step (server_step.py): FedAvgM's, kept across a resume, FedAvg's by default."""

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvgM

from pytorch_example import server_app
from pytorch_example.rounds import RunFailed
from pytorch_example.server_step import ServerStep
from pytorch_example.task import Net
from tests.scripted import ScriptedGrid, config_for, every_node_moves_the_model, mean_shift, run_rounds
from tests.test_server_app import scripted_run


def one_reply(arrays: ArrayRecord) -> Message:
    """A train reply carrying `arrays`, as FedAvg aggregates it."""
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 10})})
    sent = Message(RecordDict(), dst_node_id=1, message_type="train")
    return Message(content, reply_to=sent)


@pytest.mark.parametrize(("learning_rate", "momentum"), [(1.0, 0.9), (0.3, 0.5), (2.0, 0.0)])
def test_the_step_is_flowers_fedavgm_on_the_same_aggregates(learning_rate, momentum):
    """Flower's FedAvgM steps inside FedAvg, before DP's noise could be added, so the app
    steps after the strategy: the same models, round after round."""
    rng = np.random.default_rng(0)
    model = ArrayRecord({"w": Array(rng.normal(size=(3, 4)).astype(np.float32)),
                         "b": Array(rng.normal(size=4).astype(np.float32))})  # fmt: skip
    flower = FedAvgM(server_learning_rate=learning_rate, server_momentum=momentum)
    flower.current_arrays = model
    step = ServerStep(config_for(server_learning_rate=learning_rate, server_momentum=momentum))
    for server_round in range(1, 5):
        aggregate = ArrayRecord({key: Array(array.numpy() + rng.normal(size=array.shape).astype(np.float32))
                                 for key, array in model.items()})  # fmt: skip
        expected, _ = flower.aggregate_train(server_round, [one_reply(aggregate)])
        model = step(model, aggregate)
        for key in model:
            np.testing.assert_allclose(model[key].numpy(), expected[key].numpy(), rtol=1e-5, atol=1e-6)


def test_by_default_the_aggregate_is_the_model():
    step = ServerStep(config_for())
    aggregate = ArrayRecord(Net().state_dict())
    assert step.moves_all_the_way and step(ArrayRecord(Net().state_dict()), aggregate) is aggregate


def test_a_step_to_a_non_finite_model_keeps_the_velocity_it_had():
    step = ServerStep(config_for(server_momentum=0.9))
    model = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    step(model, ArrayRecord({"w": Array(np.ones(3, dtype=np.float32))}))
    velocity = step.velocity["w"].clone()
    stepped = step(model, ArrayRecord({"w": Array(np.array([1, np.inf, 1], dtype=np.float32))}))
    assert not np.isfinite(stepped["w"].numpy()).all()  # the round loop drops it
    assert torch.equal(step.velocity["w"], velocity)


def test_a_velocity_once_kept_is_never_changed_in_place():
    """The run's outputs hold the velocity beside its round's model, without a copy."""
    step = ServerStep(config_for(server_momentum=0.9))
    model = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    model = step(model, ArrayRecord({"w": Array(np.ones(3, dtype=np.float32))}))
    kept, before = step.velocity, step.velocity["w"].clone()
    step(model, ArrayRecord({"w": Array(np.full(3, 5, dtype=np.float32))}))
    assert torch.equal(kept["w"], before) and not torch.equal(step.velocity["w"], before)


def test_a_resumed_run_goes_on_with_the_velocity_its_folder_saved(tmp_path):
    """Through `server_app.main`: every node moves each weight by 0.01 a round; with
    momentum 0.5 the model moves 0.01, 0.015, then 0.0175 (not 0.01: a velocity lost)."""
    grid = ScriptedGrid(3, every_node_moves_the_model(by=0.01))
    momentum = {"server-momentum": 0.5}
    server_app.main(grid, scripted_run(tmp_path, **{"num-server-rounds": 2, **momentum}))
    [run_dir] = [path for path in (tmp_path / "outputs").glob("*/*") if path.is_dir()]
    saved = torch.load(run_dir / "resume.pt", weights_only=True)["server_velocity"]
    assert set(saved) == set(Net().state_dict()) and all(
        torch.allclose(velocity, torch.full_like(velocity, -0.015)) for velocity in saved.values()
    )
    resumed = scripted_run(tmp_path, **{"num-server-rounds": 3, "resume-from": str(run_dir), **momentum})
    server_app.main(grid, resumed)
    assert [entry["round"] for entry in json.loads((run_dir / "results.json").read_text())] == [1, 2, 3]
    torch.manual_seed(42)  # the run's seed: its initial model
    initial = ArrayRecord(Net().state_dict())
    final = ArrayRecord(torch.load(run_dir / "final_model.pt", weights_only=True))
    assert mean_shift(initial, final) == pytest.approx(0.01 + 0.015 + 0.0175, rel=1e-4)


def test_a_step_that_overflows_trains_nothing_and_keeps_the_model(tmp_path):
    """Through the round loop: a finite aggregate, 1e10 off, and a step of 1e30 x that
    (float32 tops out at 3.4e38): the round keeps its model, and no velocity is saved."""
    start = ArrayRecord(Net().state_dict())
    config = config_for(num_server_rounds=1, server_learning_rate=1e30, server_momentum=0.9)
    with pytest.raises(RunFailed, match="the new model from the usable replies holds NaN or Inf"):
        run_rounds(tmp_path, config, ScriptedGrid(3, every_node_moves_the_model(by=1e10)), initial=start)
    saved = torch.load(tmp_path / "resume.pt", weights_only=True)
    assert saved["server_velocity"] is None
    assert all(torch.equal(saved["arrays"][key], value) for key, value in start.to_torch_state_dict().items())
