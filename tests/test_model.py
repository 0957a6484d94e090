"""The article's network: call orders, checkpoints, prediction and training."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import random
import socket
import threading
from pathlib import Path

import pytest
import torch

import engine.model
from engine.data import load_titanic, prepare_titanic
from engine.errors import ArgumentError, CheckpointError
from engine.model import (
    CHECKPOINT_FORMAT,
    TitanicClassifier,
    TitanicMLP,
    load_weights,
    predict_proba,
    save_weights,
    train_titanic,
)


def seeded_net(layer_order: str = "article", seed: int = 0) -> TitanicMLP:
    torch.manual_seed(seed)
    return TitanicMLP(layer_order)


def seeded_rows(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 5, generator=torch.Generator().manual_seed(seed))


def assert_one_line(err: pytest.ExceptionInfo, *names: str) -> None:
    message = str(err.value)
    assert "\n" not in message, message
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"


# ---------------------------------------------------------------------------
# The network


@pytest.mark.parametrize("layer_order", ["article", "conventional"])
def test_each_order_maps_rows_to_probabilities(layer_order: str) -> None:
    probabilities = seeded_net(layer_order)(seeded_rows())
    assert probabilities.shape == (64, 1)
    assert ((probabilities > 0) & (probabilities < 1)).all()


def test_article_order_puts_l1_and_l2_back_to_back() -> None:
    net, x = seeded_net("article"), seeded_rows()
    expected = torch.sigmoid(net.r2(net.out(net.r1(net.l2(net.l1(x))))))
    torch.testing.assert_close(net(x), expected, rtol=0, atol=0)


def test_conventional_order_is_the_textbook_one() -> None:
    net, x = seeded_net("conventional"), seeded_rows()
    expected = torch.sigmoid(net.out(net.r2(net.l2(net.r1(net.l1(x))))))
    torch.testing.assert_close(net(x), expected, rtol=0, atol=0)


def test_article_is_the_default_order() -> None:
    assert TitanicMLP().layer_order == "article"


def test_orders_differ_with_the_same_weights() -> None:
    article, conventional = seeded_net("article"), seeded_net("conventional")
    weights = conventional.state_dict()
    assert all(torch.equal(value, weights[name]) for name, value in article.state_dict().items())
    x = seeded_rows()
    assert not torch.allclose(article(x), conventional(x))


def test_layers_have_the_article_shapes() -> None:
    shapes = {name: tuple(value.shape) for name, value in TitanicMLP().state_dict().items()}
    assert shapes == {
        "l1.weight": (128, 5), "l1.bias": (128,),
        "r1.weight": (1,),
        "l2.weight": (128, 128), "l2.bias": (128,),
        "r2.weight": (1,),
        "out.weight": (1, 128), "out.bias": (1,),
    }


def test_unknown_order_is_an_argument_error() -> None:
    with pytest.raises(ArgumentError) as err:
        TitanicMLP("sideways")
    assert_one_line(err, "sideways", "article", "conventional")


# ---------------------------------------------------------------------------
# Prediction


def test_predict_proba_gives_one_probability_per_row_without_grad() -> None:
    net = seeded_net()
    net.train()
    probabilities = predict_proba(net, seeded_rows(10))
    assert probabilities.shape == (10,)
    assert not probabilities.requires_grad
    assert net.training  # put back in the mode it came in


def test_predict_proba_refuses_the_wrong_width() -> None:
    with pytest.raises(ArgumentError) as err:
        predict_proba(seeded_net(), torch.zeros(3, 4))
    assert_one_line(err, "(3, 4)")


# ---------------------------------------------------------------------------
# Checkpoints


@pytest.mark.parametrize("layer_order", ["article", "conventional"])
def test_round_trip_gives_equal_outputs(tmp_path: Path, layer_order: str) -> None:
    net = seeded_net(layer_order)
    loaded = load_weights(save_weights(net, tmp_path / "net.pt"))
    assert loaded.layer_order == layer_order
    x = seeded_rows()
    torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)


def test_checkpoint_loads_with_plain_torch_weights_only(tmp_path: Path) -> None:
    path = save_weights(seeded_net("conventional"), tmp_path / "net.pt")
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == CHECKPOINT_FORMAT
    assert payload["layer_order"] == "conventional"
    assert set(payload["state_dict"]) == set(TitanicMLP().state_dict())


def test_save_leaves_no_temporary_file(tmp_path: Path) -> None:
    save_weights(seeded_net(), tmp_path / "net.pt")
    save_weights(seeded_net(seed=1), tmp_path / "net.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["net.pt"]


def test_save_accepts_the_lightning_module(tmp_path: Path) -> None:
    module = TitanicClassifier("conventional")
    loaded = load_weights(save_weights(module, tmp_path / "net.pt"))
    x = seeded_rows()
    torch.testing.assert_close(loaded(x), module(x), rtol=0, atol=0)


def test_load_can_override_the_stored_order(tmp_path: Path) -> None:
    path = save_weights(seeded_net("article"), tmp_path / "net.pt")
    assert load_weights(path, layer_order="conventional").layer_order == "conventional"


def test_bare_state_dict_loads_in_article_order(tmp_path: Path) -> None:
    net = seeded_net()
    torch.save(net.state_dict(), tmp_path / "bare.pt")
    loaded = load_weights(tmp_path / "bare.pt")
    assert loaded.layer_order == "article"
    torch.testing.assert_close(loaded(seeded_rows()), net(seeded_rows()), rtol=0, atol=0)


def test_the_digest_is_of_the_checkpoints_bytes(tmp_path: Path) -> None:
    from engine.model import load_weights_with_sha256

    path = save_weights(seeded_net(), tmp_path / "net.pt")

    net, digest = load_weights_with_sha256(path)

    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    torch.testing.assert_close(net(seeded_rows()), seeded_net()(seeded_rows()), rtol=0, atol=0)


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        load_weights(tmp_path / "absent.pt")
    assert_one_line(err, "absent.pt")


def _fifo(tmp_path: Path) -> tuple[Path, Path]:
    os.mkfifo(tmp_path / "pipe.pt")
    return tmp_path / "pipe.pt", tmp_path / "pipe.pt"


def _fifo_via_symlink(tmp_path: Path) -> tuple[Path, Path]:
    pipe, _ = _fifo(tmp_path)
    (tmp_path / "link.pt").symlink_to(pipe)
    return tmp_path / "link.pt", pipe


def _socket(tmp_path: Path) -> tuple[Path, None]:
    listener = socket.socket(socket.AF_UNIX)
    try:
        listener.bind(str(tmp_path / "s.pt"))
    except OSError:
        pytest.skip("the temporary folder's path is too long for a Unix socket")
    finally:
        listener.close()  # the socket file stays
    return tmp_path / "s.pt", None


def _device(tmp_path: Path) -> tuple[Path, None]:
    if not Path("/dev/zero").is_char_device():
        pytest.skip("needs /dev/zero")
    return Path("/dev/zero"), None


@pytest.mark.parametrize(
    ("make", "kind"),
    [(_fifo, "named pipe"), (_fifo_via_symlink, "named pipe"), (_socket, "socket"),
     (_device, "device")],
    ids=["fifo", "fifo-via-symlink", "socket", "dev-zero"],
)
def test_what_is_not_a_regular_file_is_refused_before_it_is_opened(
    tmp_path: Path, make, kind: str
) -> None:
    path, pipe = make(tmp_path)

    message = load_error_without_waiting(path, pipe)

    assert "\n" not in message and str(path) in message and kind in message, message


def test_a_pipe_put_in_place_after_the_check_is_refused_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save_weights(seeded_net(), tmp_path / "net.pt")
    checked = engine.model._check_regular_file

    def check_then_swap(checked_path: Path) -> None:
        checked(checked_path)
        checked_path.unlink()
        os.mkfifo(checked_path)

    monkeypatch.setattr(engine.model, "_check_regular_file", check_then_swap)

    message = load_error_without_waiting(path, path)

    assert "\n" not in message and "net.pt" in message and "named pipe" in message, message


def load_error_without_waiting(path: Path, pipe: Path | None, seconds: float = 10) -> str:
    """The message of the CheckpointError that ``load_weights(path)`` raises at once.

    Opening a pipe to read waits for a writer: if the loader is still busy after
    ``seconds``, this becomes a writer that closes at once, so the loader sees end of
    file and the test fails instead of hanging.
    """
    outcome: list[BaseException] = []

    def load() -> None:
        try:
            load_weights(path)
        except Exception as err:
            outcome.append(err)

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    loader.join(timeout=seconds)
    if loader.is_alive():
        if pipe is not None:
            os.close(os.open(pipe, os.O_WRONLY))
        loader.join(timeout=seconds)
        pytest.fail(f"load_weights({path}) waited for a writer")
    assert len(outcome) == 1 and isinstance(outcome[0], CheckpointError), outcome
    return str(outcome[0])


def test_garbage_bytes_are_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(random.Random(0).randbytes(256))
    with pytest.raises(CheckpointError) as err:
        load_weights(path)
    assert_one_line(err, "garbage.pt")


class RunsCode:
    """Unpickling this would create a folder: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_that_would_run_code_is_refused_and_never_runs(
    tmp_path: Path, writer: str
) -> None:
    marker, path = tmp_path / "code-ran", tmp_path / "evil.pt"
    payload = {"format": CHECKPOINT_FORMAT, "state_dict": RunsCode(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with path.open("wb") as stream:
            pickle.dump(payload, stream, protocol=2)
    with pytest.raises(CheckpointError) as err:
        load_weights(path)
    assert_one_line(err, "evil.pt")
    assert "weights_only=False" not in str(err.value)
    assert not marker.exists()


def test_wrong_shapes_are_named(tmp_path: Path) -> None:
    state_dict = seeded_net().state_dict()
    state_dict["l1.weight"] = torch.zeros(64, 5)
    torch.save({"format": CHECKPOINT_FORMAT, "layer_order": "article",
                "state_dict": state_dict}, tmp_path / "shapes.pt")
    with pytest.raises(CheckpointError) as err:
        load_weights(tmp_path / "shapes.pt")
    assert_one_line(err, "shapes.pt", "l1.weight", "(64, 5)", "(128, 5)")


def test_wrong_keys_are_named(tmp_path: Path) -> None:
    state_dict = seeded_net().state_dict()
    state_dict["fc9.weight"] = state_dict.pop("out.weight")
    torch.save({"format": CHECKPOINT_FORMAT, "layer_order": "article",
                "state_dict": state_dict}, tmp_path / "keys.pt")
    with pytest.raises(CheckpointError) as err:
        load_weights(tmp_path / "keys.pt")
    assert_one_line(err, "keys.pt", "out.weight", "fc9.weight")


def test_non_finite_weights_are_named(tmp_path: Path) -> None:
    net = seeded_net()
    with torch.no_grad():
        net.l2.weight[3, 4] = float("nan")
        net.out.bias[0] = float("-inf")
    path = save_weights(net, tmp_path / "diverged.pt")

    with pytest.raises(CheckpointError) as err:
        load_weights(path)
    assert_one_line(err, "diverged.pt", "nan or inf", "parameter l2.weight: 1 of 16,384 values",
                    "parameter out.bias: 1 of 1 values")


def save_state_dict(state_dict: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save({"format": CHECKPOINT_FORMAT, "layer_order": "article",
                "state_dict": state_dict}, path)
    return path


SPARSE_LAYOUTS = {
    "sparse_coo": torch.Tensor.to_sparse,
    "sparse_csr": torch.Tensor.to_sparse_csr,
    "sparse_csc": torch.Tensor.to_sparse_csc,
    "sparse_bsr": lambda weight: weight.to_sparse_bsr((1, 1)),
    "sparse_bsc": lambda weight: weight.to_sparse_bsc((1, 1)),
}


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("layout", SPARSE_LAYOUTS)
def test_sparse_weights_are_refused_by_name(tmp_path: Path, layout: str) -> None:
    # The compressed layouts need two dimensions: the matrices go sparse, the biases stay.
    state_dict = {name: SPARSE_LAYOUTS[layout](value) if value.ndim == 2 else value
                  for name, value in seeded_net().state_dict().items()}
    path = save_state_dict(state_dict, tmp_path / "sparse.pt")

    with pytest.raises(CheckpointError) as err:
        load_weights(path)
    assert_one_line(err, "sparse.pt", "dense (strided)",
                    f"l1.weight, l2.weight, out.weight are {layout}")
    assert "bias" not in str(err.value)


def test_one_sparse_weight_is_named_alone(tmp_path: Path) -> None:
    state_dict = seeded_net().state_dict()
    state_dict["l2.bias"] = state_dict["l2.bias"].to_sparse()
    path = save_state_dict(state_dict, tmp_path / "sparse.pt")

    with pytest.raises(CheckpointError) as err:
        load_weights(path)
    assert_one_line(err, "sparse.pt", "dense (strided)", "l2.bias is sparse_coo")


def test_weights_saved_without_their_values_are_refused(tmp_path: Path) -> None:
    state_dict = {name: value.to("meta") for name, value in seeded_net().state_dict().items()}
    path = save_state_dict(state_dict, tmp_path / "meta.pt")

    with pytest.raises(CheckpointError) as err:
        load_weights(path)
    assert_one_line(err, "meta.pt", f"{', '.join(state_dict)} are meta")


def _quantized(value: torch.Tensor) -> torch.Tensor:
    return torch.quantize_per_tensor(value, scale=0.01, zero_point=0, dtype=torch.qint8)


# Each would change meaning on the way into float32: the imaginary part dropped, an
# integer or quantized value read without its scale, a bool turned into 0.0 or 1.0.
REFUSED_DTYPES = {
    "complex64": lambda value: value.to(torch.complex64),
    "complex128": lambda value: value.to(torch.complex128),
    "int64": lambda value: value.to(torch.int64),
    "int8": lambda value: value.to(torch.int8),
    "uint8": lambda value: value.to(torch.uint8),
    "bool": lambda value: value.to(torch.bool),
    "qint8": _quantized,
}


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
@pytest.mark.parametrize("dtype", REFUSED_DTYPES)
def test_weights_that_are_not_real_floating_point_are_refused(tmp_path: Path, dtype: str) -> None:
    state_dict = {name: REFUSED_DTYPES[dtype](value)
                  for name, value in seeded_net().state_dict().items()}
    path = save_state_dict(state_dict, tmp_path / "typed.pt")

    with pytest.raises(CheckpointError) as err:
        load_weights(path)
    assert_one_line(err, "typed.pt", "real floating point", f"{', '.join(state_dict)} are {dtype}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64,
                                   torch.float8_e4m3fn])
def test_other_floating_point_weights_load_as_float32(tmp_path: Path, dtype: torch.dtype) -> None:
    # float16, bfloat16 and float8 values are all float32 values, and these float64 ones
    # came from float32: each loads exactly as saved.
    state_dict = {name: value.to(dtype) for name, value in seeded_net().state_dict().items()}
    loaded = load_weights(save_state_dict(state_dict, tmp_path / "typed.pt"))

    for name, value in loaded.state_dict().items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, state_dict[name].float(), rtol=0, atol=0)


def test_float64_weights_beyond_float32_are_refused_by_name(tmp_path: Path) -> None:
    state_dict = {name: value.double() for name, value in seeded_net().state_dict().items()}
    state_dict["l2.bias"][7] = -1e300
    path = save_state_dict(state_dict, tmp_path / "wide.pt")

    with pytest.raises(CheckpointError) as err:
        load_weights(path)
    assert_one_line(err, "wide.pt", "float32", "l2.bias holds -1e+300")
    assert "nan or inf" not in str(err.value)


def test_float64_weights_that_become_zero_in_float32_are_named_in_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state_dict = {name: value.double() for name, value in seeded_net().state_dict().items()}
    # float32's smallest value is about 1.4e-45; 1e-300 and -5e-46 round to zero.
    state_dict["l2.bias"][7] = 1e-300
    state_dict["out.weight"][0, :3] = torch.tensor([-5e-46, 1e-300, 1e-40], dtype=torch.float64)
    path = save_state_dict(state_dict, tmp_path / "tiny.pt")

    with caplog.at_level(logging.WARNING, logger="engine.model"):
        net = load_weights(path)

    assert net.l2.bias[7] == 0 and net.out.weight[0, 2] != 0  # 1e-40 is a float32 value
    (record,) = [r for r in caplog.records if r.name == "engine.model"]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "tiny.pt" in message and "loaded as 0" in message
    assert "l2.bias: 1 of 128 values; out.weight: 2 of 128 values" in message


def test_float64_weights_that_fit_float32_load_without_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state_dict = {name: value.double() for name, value in seeded_net().state_dict().items()}
    state_dict["l2.bias"][7] = 0.0
    path = save_state_dict(state_dict, tmp_path / "plain.pt")

    with caplog.at_level(logging.WARNING, logger="engine.model"):
        load_weights(path)

    assert not [r for r in caplog.records if r.name == "engine.model"]


def test_unknown_stored_order_is_a_checkpoint_error(tmp_path: Path) -> None:
    torch.save({"format": CHECKPOINT_FORMAT, "layer_order": "sideways",
                "state_dict": seeded_net().state_dict()}, tmp_path / "order.pt")
    with pytest.raises(CheckpointError) as err:
        load_weights(tmp_path / "order.pt")
    assert_one_line(err, "order.pt", "sideways")


# ---------------------------------------------------------------------------
# Training on the real data


@pytest.fixture(scope="module")
def data(titanic_csv: Path):
    return prepare_titanic(load_titanic(titanic_csv), source=titanic_csv)


@pytest.fixture(scope="module")
def trained_twice(data):
    return [train_titanic(data, epochs=20, seed=404, accelerator="cpu") for _ in range(2)]


def test_twenty_epochs_reach_the_article_accuracy(data, trained_twice) -> None:
    probabilities = predict_proba(trained_twice[0], data.test_features)
    accuracy = ((probabilities > 0.5).float() == data.test_labels).float().mean().item()
    assert accuracy >= 0.80


def test_same_seed_gives_identical_weights(trained_twice) -> None:
    first, second = (module.net.state_dict() for module in trained_twice)
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_trained_module_is_in_eval_mode_on_the_cpu(trained_twice) -> None:
    module = trained_twice[0]
    assert not module.training
    assert all(p.device.type == "cpu" for p in module.parameters())


def test_training_logs_losses_and_accuracy(trained_twice) -> None:
    assert {"train_loss", "val_loss", "val_acc"} <= set(trained_twice[0].trainer.callback_metrics)


def test_training_leaves_deterministic_mode_as_it_found_it(trained_twice) -> None:
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("epochs", [0, -1, 2.5, True])
def test_epochs_must_be_a_positive_integer(data, epochs) -> None:
    with pytest.raises(ArgumentError) as err:
        train_titanic(data, epochs=epochs)
    assert_one_line(err, "epochs", repr(epochs))


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_damaged_checkpoint_says_so(tmp_path: Path, damage: str) -> None:
    good = save_weights(TitanicMLP(), tmp_path / "good.pt").read_bytes()
    if damage == "truncated":
        damaged = good[: len(good) // 2]
    else:
        damaged = good[:300] + bytes(b ^ 0x5A for b in good[300:340]) + good[340:]
    path = tmp_path / "damaged.pt"
    path.write_bytes(damaged)
    with pytest.raises(CheckpointError, match="truncated or corrupted") as err:
        load_weights(path)
    assert_one_line(err, "damaged.pt")


@pytest.mark.parametrize("given", [None, "article", "conventional"])
def test_a_bare_state_dict_says_it_stores_no_layer_order(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, given: str | None
) -> None:
    # Both orders have the same parameters, so a conventional network's bare state dict
    # loads without complaint as the article's: a different function.
    path = tmp_path / "bare.pt"
    torch.save(TitanicMLP("conventional").state_dict(), path)

    with caplog.at_level(logging.WARNING, logger="engine.model"):
        net = load_weights(path, layer_order=given)

    warned = [r.getMessage() for r in caplog.records if r.name == "engine.model"]
    assert net.layer_order == (given or "article")
    if given is None:
        (message,) = warned
        assert "bare.pt is a bare state dict" in message
        assert "l1 -> l2 -> r1 -> out -> r2" in message
    else:
        assert warned == []


def _lightning_checkpoint(module, path: Path) -> Path:
    """``module`` fitted for one step of random rows, saved by Lightning's Trainer."""
    import pytorch_lightning as pl

    rows = torch.utils.data.TensorDataset(seeded_rows(8), torch.ones(8))
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(rows, batch_size=8))
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize("layer_order", ["article", "conventional"])
def test_a_lightning_checkpoint_of_the_classifier_loads_with_its_order(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, layer_order: str
) -> None:
    # As ModelCheckpoint writes them; before, "not an engine checkpoint (holds a dict)".
    torch.manual_seed(5)
    module = TitanicClassifier(layer_order=layer_order)
    path = _lightning_checkpoint(module, tmp_path / "epoch=0.ckpt")

    with caplog.at_level(logging.WARNING, logger="engine.model"):
        net = load_weights(path)

    assert net.layer_order == layer_order
    assert [r for r in caplog.records if r.name == "engine.model"] == []
    for name, value in module.net.state_dict().items():
        assert torch.equal(net.state_dict()[name], value), name


def test_a_lightning_checkpoint_of_another_module_is_named(tmp_path: Path) -> None:
    import pytorch_lightning as pl

    class Other(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(5, 1)

        def training_step(self, batch, _):
            return self.body(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    path = _lightning_checkpoint(Other(), tmp_path / "other.ckpt")

    with pytest.raises(CheckpointError) as err:
        load_weights(path)

    assert_one_line(err, "other.ckpt", "a Lightning checkpoint without the Titanic network's "
                    "weights (no 'net.*' entries", "engine.model.TitanicClassifier")


@pytest.mark.parametrize("attribute", ["net", "model"])
def test_a_lightning_checkpoint_of_a_module_around_the_classifier_names_where_it_is(
    tmp_path: Path, attribute: str
) -> None:
    # Before: under "net" the bare-state-dict warning and a list of every key, missing and
    # unexpected; under "model", "without the Titanic network's weights".
    import pytorch_lightning as pl

    class Around(pl.LightningModule):
        def __init__(self):
            super().__init__()
            setattr(self, attribute, TitanicClassifier())

        def training_step(self, batch, _):
            return getattr(self, attribute)(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    path = _lightning_checkpoint(Around(), tmp_path / "around.ckpt")

    with pytest.raises(CheckpointError) as err:
        load_weights(path)

    assert_one_line(err, "around.ckpt", f"under '{attribute}.net.', not 'net.'",
                    "engine.model.save_weights")


def test_a_state_dict_of_a_module_around_the_network_names_the_prefix(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    around = torch.nn.Module()
    around.body = TitanicClassifier()
    path = tmp_path / "around.pt"
    torch.save(around.state_dict(), path)

    with pytest.raises(CheckpointError) as err:
        load_weights(path, layer_order="article")

    assert_one_line(err, "around.pt", "under 'body.net.'", "engine.model.save_weights")
    # A state dict with one entry more than the network is still named key by key.
    extra = {**TitanicMLP().state_dict(), "body.l1.weight": torch.zeros(128, 5)}
    torch.save(extra, path)
    with pytest.raises(CheckpointError, match="unexpected body.l1.weight"):
        load_weights(path, layer_order="article")


@pytest.mark.parametrize("kind", ["engine", "lightning"])
def test_a_layer_order_that_is_not_a_name_is_one_line_checkpoint_error(
    tmp_path: Path, kind: str
) -> None:
    # A list there raised TypeError (unhashable) from the lookup.
    state_dict = TitanicMLP().state_dict()
    if kind == "engine":
        payload = {"format": CHECKPOINT_FORMAT, "layer_order": ["article"],
                   "state_dict": state_dict}
    else:
        payload = {"pytorch-lightning_version": "2.5.0",
                   "hyper_parameters": {"layer_order": ["article"]},
                   "state_dict": {f"net.{name}": value for name, value in state_dict.items()}}
    path = tmp_path / "odd.pt"
    torch.save(payload, path)

    with pytest.raises(CheckpointError) as err:
        load_weights(path)

    assert_one_line(err, "odd.pt", "layer_order ['article'] is not one of 'article', "
                    "'conventional'")
