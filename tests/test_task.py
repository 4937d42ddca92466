"""The model, batch augmentation, and the train/test loops."""

import subprocess
import sys

import torch
import torch.nn.functional as F

from harness.flower_processes import REPO
from harness.synthetic_fmnist import make_split
from pytorch_example import task
from pytorch_example.data import ImageSet

CPU = torch.device("cpu")
SGD = task.SGD(learning_rate=0.1, momentum=0.9, batch_size=32, device=CPU)


def image_set(count: int, seed: int) -> ImageSet:
    images, labels = make_split(count, seed)
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels.astype("int64")))


def test_net_has_the_reference_shape():
    net = task.Net()
    assert net(torch.zeros(7, 1, 28, 28)).shape == (7, 10)
    shapes = {name: tuple(value.shape) for name, value in net.state_dict().items()}
    assert shapes["conv1.weight"] == (16, 1, 5, 5)
    assert shapes["conv2.weight"] == (32, 16, 5, 5)
    assert shapes["fc1.weight"] == (128, 512)
    assert shapes["fc2.weight"] == (10, 128)


def test_normalize_maps_uint8_to_normalised_channels():
    images = torch.tensor([[[0, 255]]], dtype=torch.uint8)
    normalised = task.normalize(images)
    assert normalised.shape == (1, 1, 1, 2)
    expected = (torch.tensor([0.0, 1.0]) - task.NORMALIZE_MEAN) / task.NORMALIZE_STD
    torch.testing.assert_close(normalised.flatten(), expected)


def test_augment_is_a_padded_crop_optionally_flipped():
    images = torch.randint(1, 256, (64, 28, 28), dtype=torch.uint8)
    augmented = task.augment(images, torch.Generator().manual_seed(0))
    assert augmented.shape == images.shape and augmented.dtype == torch.uint8
    padded = F.pad(images, (4, 4, 4, 4))
    flips = 0
    for image, padded_image in zip(augmented, padded, strict=True):
        windows = padded_image.unfold(0, 28, 1).unfold(1, 28, 1)  # [9, 9, 28, 28]
        straight = (windows == image).flatten(2).all(-1).any()
        mirrored = (windows == image.flip(-1)).flatten(2).all(-1).any()
        assert straight or mirrored
        flips += int(mirrored and not straight)
    assert 10 < flips < 54  # about half, as RandomHorizontalFlip(p=0.5)


def test_augment_draws_every_offset():
    images = torch.zeros(2000, 28, 28, dtype=torch.uint8)
    images[:, 0, 0] = 255  # a marker whose position reveals the offset
    augmented = task.augment(images, torch.Generator().manual_seed(1))
    rows = augmented.flatten(1).argmax(1) // 28
    # Offsets 0..8; the marker is visible for vertical offsets 0..4 at rows 4..0.
    assert set(rows[augmented.flatten(1).amax(1) > 0].tolist()) == {0, 1, 2, 3, 4}


def test_train_learns_and_is_reproducible():
    train_set, test_set = image_set(1500, 0), image_set(500, 1)

    def run(seed: int) -> tuple[float, float, float]:
        torch.manual_seed(0)
        net = task.Net()
        loss = task.train(net, train_set, 2, SGD, torch.Generator().manual_seed(seed))
        return (loss, *task.test(net, test_set, 256, CPU))

    first, again, other = run(0), run(0), run(1)
    assert first == again
    assert first != other
    assert first[2] > 0.5  # accuracy well above chance (0.1)


def test_fit_head_moves_the_head_alone_and_repeats_under_a_seed():
    data = image_set(300, seed=3)
    start = task.Net()
    heads = []
    for seed in (5, 5, 6):
        net = task.Net()
        net.load_state_dict(start.state_dict())
        task.fit_head(net, data, 0, 3, SGD, torch.Generator().manual_seed(seed))
        for name, value in net.state_dict().items():
            if name not in task.HEAD_KEYS:
                assert torch.equal(value, start.state_dict()[name]), name
        heads.append(net.fc2.state_dict())
        assert task.test(net, data, 64, CPU)[0] < task.test(start, data, 64, CPU)[0]
    assert all(torch.equal(heads[0][key], heads[1][key]) for key in heads[0])
    assert not torch.equal(heads[0]["weight"], heads[2]["weight"])


def test_fit_head_takes_the_steps_of_torch_optim_sgd_on_the_head():
    """Its written-out gradient against autograd and `torch.optim.SGD`, on the same sample
    in the same order: 2 epochs of 7 batches (the last of 1 row), so the momentum carries
    across steps."""
    data, start = image_set(300, seed=3), task.Net()
    initial_head = start.fc2.weight.detach().clone()
    ours = task.Net()
    ours.load_state_dict(start.state_dict())
    task.fit_head(ours, data, 97, 2, task.SGD(0.05, 0.9, 16, CPU), torch.Generator().manual_seed(7))

    generator = torch.Generator().manual_seed(7)
    sample = torch.randperm(len(data), generator=generator)[:97]
    features = task.body_features(start, data.images[sample], 256, CPU)
    labels = data.labels[sample]
    optimizer = torch.optim.SGD(start.fc2.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        for batch in torch.randperm(97, generator=generator).split(16):
            optimizer.zero_grad()
            F.cross_entropy(start.fc2(features[batch]), labels[batch]).backward()
            optimizer.step()
    for key, value in start.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)
    assert not torch.equal(ours.fc2.weight, initial_head)


def test_fit_head_runs_the_body_over_its_sample_of_rows_only(monkeypatch):
    data = image_set(300, seed=3)
    seen = []
    body_features = task.body_features

    def recording_body_features(net, images, batch_size, device):
        seen.append(images)
        return body_features(net, images, batch_size, device)

    monkeypatch.setattr(task, "body_features", recording_body_features)
    for rows in (64, 0, 1000):
        task.fit_head(task.Net(), data, rows, 1, SGD, torch.Generator().manual_seed(0))
    assert [len(images) for images in seen] == [64, 300, 300]
    rows_of_data = {image.numpy().tobytes() for image in data.images}
    sampled = [image.numpy().tobytes() for image in seen[0]]
    assert len(set(sampled)) == 64 and set(sampled) <= rows_of_data  # distinct rows of `data`
    assert not torch.equal(seen[0], data.images[:64])  # drawn at random, not the first rows


def test_a_frozen_head_stays_put_in_training():
    net = task.Net()
    head = {key: value.clone() for key, value in net.fc2.state_dict().items()}
    body = net.fc1.weight.detach().clone()
    net.fc2.requires_grad_(False)
    task.train(net, image_set(64, seed=1), 1, SGD, torch.Generator().manual_seed(0))
    assert all(torch.equal(net.fc2.state_dict()[key], head[key]) for key in head)
    assert not torch.equal(net.fc1.weight, body)


def test_head_keys_name_the_head_in_the_state_dict():
    assert set(task.HEAD_KEYS) == {f"fc2.{name}" for name in task.Net().fc2.state_dict()}


def test_test_does_not_depend_on_batch_size():
    net, test_set = task.Net(), image_set(300, 2)
    loss_small, acc_small = task.test(net, test_set, 7, CPU)
    loss_big, acc_big = task.test(net, test_set, 1000, CPU)
    assert abs(loss_small - loss_big) < 1e-5 and acc_small == acc_big
    assert net.training is False


def test_momentum_sgd_matches_torch_optim_sgd_step_for_step():
    torch.manual_seed(3)
    ours, theirs = task.Net(), task.Net()
    theirs.load_state_dict(ours.state_dict())
    start = {name: value.clone() for name, value in ours.state_dict().items()}
    our_optimizer = task.MomentumSGD(ours.parameters(), lr=0.1, momentum=0.9)
    their_optimizer = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
    data = image_set(64, 4)
    inputs = task.normalize(data.images)
    for batch in torch.arange(64).split(8):  # 8 steps: the momentum buffers matter
        for net, optimizer in ((ours, our_optimizer), (theirs, their_optimizer)):
            optimizer.zero_grad()
            F.cross_entropy(net(inputs[batch]), data.labels[batch]).backward()
            optimizer.step()
    for (name, our_value), their_value in zip(
        ours.state_dict().items(), theirs.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(our_value, their_value, rtol=0, atol=0, msg=name)
    # Both took the steps: every weight moved from where both started (a step-for-step
    # match of two optimisers that did nothing would prove nothing).
    assert all(not torch.equal(ours.state_dict()[name], start[name]) for name in start)


def test_training_never_imports_torch_dynamo():
    """The class optimizers import torch._dynamo (seconds) on their first step."""
    code = (
        "import sys, torch\n"
        "from pytorch_example import task\n"
        "from harness.synthetic_fmnist import make_split\n"
        "images, labels = make_split(64, 0)\n"
        "data = task.ImageSet(torch.from_numpy(images), torch.from_numpy(labels.astype('int64')))\n"
        "generator = torch.Generator().manual_seed(0)\n"
        "sgd = task.SGD(0.1, 0.9, 32, torch.device('cpu'))\n"
        "task.train(task.Net(), data, 1, sgd, generator)\n"
        "task.fit_head(task.Net(), data, 32, 1, sgd, generator)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
