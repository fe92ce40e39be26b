import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from funmatch_keras import Distiller


def test_teacher_frozen_and_only_student_trainable(rng, toy):
    teacher, student = toy.mlp(seed=1), toy.mlp(seed=2)
    before = [w.copy() for w in teacher.get_weights()]
    distiller = Distiller(teacher, student, temperature=2.0)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2))
    x, y = toy.data(rng)
    student_before = [w.copy() for w in student.get_weights()]
    distiller.fit(x, y, batch_size=4, epochs=2, verbose=0)
    for a, b in zip(before, teacher.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(student_before, student.get_weights()))
    trainable = {id(v) for v in distiller.trainable_variables}
    assert trainable == {id(v) for v in student.trainable_variables}


def test_loss_equals_reference_and_labels_do_not_enter(rng, numpy_kl, toy):
    teacher, student = toy.mlp(seed=1), toy.mlp(seed=2)
    distiller = Distiller(teacher, student, temperature=3.0)
    distiller.compile(optimizer="sgd")
    x, y = toy.data(rng)
    expected = numpy_kl(teacher.predict(x, verbose=0),
                                     student.predict(x, verbose=0), 3.0)
    with_labels = distiller.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
    without = distiller.evaluate(x, batch_size=16, verbose=0, return_dict=True)
    assert with_labels["loss"] == pytest.approx(expected.mean(), rel=1e-5)
    assert without["loss"] == pytest.approx(with_labels["loss"], rel=1e-6)
    assert "student_top1" not in without and "agreement" in without


def test_eval_metrics_match_numpy(rng, numpy_kl, toy):
    teacher, student = toy.mlp(seed=1), toy.mlp(seed=2)
    distiller = Distiller(teacher, student)
    distiller.compile(optimizer="sgd")
    x, y = toy.data(rng, n=32)
    t, s = teacher.predict(x, verbose=0), student.predict(x, verbose=0)
    logs = distiller.evaluate(x, y, batch_size=8, verbose=0, return_dict=True)
    assert logs["student_top1"] == pytest.approx(np.mean(s.argmax(1) == y))
    assert logs["teacher_top1"] == pytest.approx(np.mean(t.argmax(1) == y))
    assert logs["agreement"] == pytest.approx(np.mean(s.argmax(1) == t.argmax(1)))
    assert logs["kl"] == pytest.approx(numpy_kl(t, s, 1.0).mean(), rel=1e-5)


def test_training_logs_only_the_loss(rng, toy):
    distiller = Distiller(toy.mlp(seed=1), toy.mlp(seed=2))
    distiller.compile(optimizer="sgd")
    x, y = toy.data(rng)
    history = distiller.fit(x, y, validation_data=(x, y), epochs=1, verbose=0)
    assert set(history.history) == {
        "loss", "val_loss", "val_student_top1", "val_teacher_top1", "val_agreement", "val_kl"
    }


@pytest.mark.parametrize("run_eagerly", [False, True])
def test_logged_names_do_not_depend_on_call_order(rng, run_eagerly, toy):
    # What each step reports is decided per step kind, not by state left by the
    # previous step: evaluate before fit, fit, then evaluate again.
    distiller = Distiller(toy.mlp(seed=1), toy.mlp(seed=2))
    distiller.compile(optimizer="sgd", run_eagerly=run_eagerly)
    x, y = toy.data(rng)
    first = distiller.evaluate(x, y, batch_size=8, verbose=0, return_dict=True)
    history = distiller.fit(x, y, batch_size=8, epochs=1, verbose=0)
    again = distiller.evaluate(x, y, batch_size=8, verbose=0, return_dict=True)
    unlabeled = distiller.evaluate(x, batch_size=8, verbose=0, return_dict=True)
    eval_names = ["agreement", "kl", "loss", "student_top1", "teacher_top1"]
    assert sorted(first) == sorted(again) == eval_names
    assert sorted(history.history) == ["loss"]
    assert sorted(unlabeled) == ["agreement", "kl", "loss"]
    assert unlabeled["kl"] == pytest.approx(again["kl"], rel=1e-6)


def test_ensemble_is_mean_of_logits(rng, numpy_kl, toy):
    t1, t2, student = toy.mlp(seed=1), toy.mlp(seed=3), toy.mlp(seed=2)
    x, _ = toy.data(rng)
    distiller = Distiller([t1, t2], student, temperature=2.0)
    mean = (t1.predict(x, verbose=0) + t2.predict(x, verbose=0)) / 2
    np.testing.assert_allclose(distiller.teacher_logits(x).numpy(), mean, atol=1e-6)
    distiller.compile(optimizer="sgd")
    loss = distiller.evaluate(x, batch_size=16, verbose=0, return_dict=True)["loss"]
    expected = numpy_kl(mean, student.predict(x, verbose=0), 2.0).mean()
    assert loss == pytest.approx(expected, rel=1e-5)


def test_dict_batches_route_each_view_to_its_model(rng, numpy_kl, toy):
    # Different input sizes make a wrong routing fail loudly.
    teacher, student = toy.mlp(input_dim=9, seed=1), toy.mlp(input_dim=6, seed=2)
    distiller = Distiller(teacher, student)
    distiller.compile(optimizer="sgd")
    xs, y = toy.data(rng, dim=6)
    xt, _ = toy.data(rng, dim=9)
    logs = distiller.evaluate({"student": xs, "teacher": xt}, y, batch_size=16, verbose=0,
                              return_dict=True)
    expected = numpy_kl(teacher.predict(xt, verbose=0),
                                     student.predict(xs, verbose=0), 1.0)
    assert logs["loss"] == pytest.approx(expected.mean(), rel=1e-5)
    np.testing.assert_allclose(distiller.predict({"student": xs, "teacher": xt}, verbose=0),
                               student.predict(xs, verbose=0), atol=1e-6)
    distiller.fit({"student": xs, "teacher": xt}, epochs=1, batch_size=8, verbose=0)


def test_precomputed_teacher_logits_without_teacher(rng, numpy_kl, toy):
    student = toy.mlp(seed=2)
    distiller = Distiller(None, student, temperature=2.0)
    distiller.compile(optimizer="sgd")
    xs, _ = toy.data(rng)
    logits = rng.normal(size=(16, toy.NUM_CLASSES)).astype(np.float32)
    loss = distiller.evaluate(
        {"student": xs, "teacher_logits": logits}, batch_size=16, verbose=0, return_dict=True
    )["loss"]
    expected = numpy_kl(logits, student.predict(xs, verbose=0), 2.0).mean()
    assert loss == pytest.approx(expected, rel=1e-5)


def test_errors_name_the_fix(rng, toy):
    with pytest.raises(ValueError, match="temperature=0"):
        Distiller(toy.mlp(), toy.mlp(), temperature=0)
    with pytest.raises(ValueError, match="outputs 7 classes but the student outputs 5"):
        Distiller(toy.mlp(num_classes=7), toy.mlp(num_classes=5))
    xs, _ = toy.data(rng)
    distiller = Distiller(None, toy.mlp())
    distiller.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="teacher=None.*'teacher_logits'"):
        distiller.fit(xs, epochs=1, verbose=0)
    distiller = Distiller(toy.mlp(seed=1), toy.mlp(seed=2))
    distiller.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="no 'student' images"):
        distiller.fit({"teacher": xs}, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="neither 'teacher' images nor 'teacher_logits'"):
        distiller.fit({"student": xs}, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"Unknown batch keys \['studnet'\]"):
        distiller.fit({"studnet": xs, "teacher": xs}, epochs=1, verbose=0)


def one_step_weights(strategy, mlp, x, teacher_weights, student_weights):
    with strategy.scope():
        teacher, student = mlp(seed=1), mlp(seed=2)
        teacher.set_weights(teacher_weights)
        student.set_weights(student_weights)
        distiller = Distiller(teacher, student, temperature=2.0)
        distiller.compile(optimizer=keras.optimizers.SGD(0.5))
    ds = tf.data.Dataset.from_tensor_slices(x).batch(len(x))
    history = distiller.fit(ds, epochs=1, verbose=0)
    return student.get_weights(), history.history["loss"][0]


def test_mirrored_strategy_matches_one_device(rng, two_cpu_strategy, toy):
    x, _ = toy.data(rng, n=16)
    tw, sw = toy.mlp(seed=1).get_weights(), toy.mlp(seed=2).get_weights()
    one_device = tf.distribute.OneDeviceStrategy("/cpu:0")
    one_weights, one_loss = one_step_weights(one_device, toy.mlp, x, tw, sw)
    two_weights, two_loss = one_step_weights(two_cpu_strategy, toy.mlp, x, tw, sw)
    assert any(np.abs(a - b).max() > 1e-4 for a, b in zip(sw, one_weights))  # the step moved
    for a, b in zip(one_weights, two_weights):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert two_loss == pytest.approx(one_loss, rel=1e-6)


def test_mirrored_strategy_evaluate_matches_one_device(rng, two_cpu_strategy, toy):
    x, y = toy.data(rng, n=16)
    tw, sw = toy.mlp(seed=1).get_weights(), toy.mlp(seed=2).get_weights()
    results = []
    for strategy in (tf.distribute.OneDeviceStrategy("/cpu:0"), two_cpu_strategy):
        with strategy.scope():
            teacher, student = toy.mlp(seed=1), toy.mlp(seed=2)
            teacher.set_weights(tw)
            student.set_weights(sw)
            distiller = Distiller(teacher, student)
            distiller.compile(optimizer="sgd")
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
        results.append(distiller.evaluate(ds, verbose=0, return_dict=True))
    one, two = results
    assert sorted(two) == ["agreement", "kl", "loss", "student_top1", "teacher_top1"]
    for name in one:
        assert two[name] == pytest.approx(one[name], rel=1e-5, abs=1e-7), name


JAX_SCRIPT = textwrap.dedent(
    """
    import numpy as np, keras
    assert keras.backend.backend() == "jax"
    from funmatch_keras import Distiller
    rng = np.random.default_rng(0)
    def mlp(seed):
        keras.utils.set_random_seed(seed)
        return keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu"),
                                 keras.layers.Dense(5)])
    teacher, student = mlp(1), mlp(2)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = teacher.predict(x, verbose=0).argmax(1)
    frozen = [w.copy() for w in teacher.get_weights()]
    d = Distiller(teacher, student, temperature=2.0)
    d.compile(optimizer=keras.optimizers.Adam(1e-2))
    h = d.fit(x, y, batch_size=16, epochs=40, verbose=0, validation_data=(x, y))
    assert sorted(h.history) == ["loss", "val_agreement", "val_kl", "val_loss",
                                 "val_student_top1", "val_teacher_top1"], sorted(h.history)
    logs = d.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
    assert sorted(logs) == ["agreement", "kl", "loss", "student_top1", "teacher_top1"]
    unlabeled = d.evaluate(x, batch_size=16, verbose=0, return_dict=True)
    assert sorted(unlabeled) == ["agreement", "kl", "loss"], sorted(unlabeled)
    s = student.predict(x, verbose=0)
    assert abs(logs["agreement"] - np.mean(s.argmax(1) == y)) < 1e-6  # y: teacher argmax
    assert abs(logs["teacher_top1"] - 1.0) < 1e-6
    assert abs(unlabeled["agreement"] - logs["agreement"]) < 1e-6
    assert all(np.array_equal(a, b) for a, b in zip(frozen, teacher.get_weights()))
    print("LOSS", h.history["loss"][0], h.history["loss"][-1], "AGREE", logs["agreement"])
    # The first-batch checks (static shapes, at trace time) hold under JAX too.
    wide = keras.Sequential([keras.Input((9,)), keras.layers.Dense(5)])
    one_tensor = Distiller(wide, mlp(3))
    one_tensor.compile(optimizer="sgd")
    try:
        one_tensor.fit(x, epochs=1, verbose=0)
        raise AssertionError("one tensor for two input sizes was accepted")
    except ValueError as error:
        assert '"Batches the Distiller accepts"' in str(error), error
    try:
        d.evaluate(x, np.eye(5)[y], verbose=0)
        raise AssertionError("one-hot labels were accepted")
    except ValueError as error:
        assert "one-hot" in str(error), error
    print("CHECKS OK")
    """
)


@pytest.mark.slow
def test_trains_under_jax_backend(tmp_path):
    pytest.importorskip("jax")
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", JAX_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "CHECKS OK" in out.stdout
    line = next(row for row in out.stdout.splitlines() if row.startswith("LOSS"))
    _, first, last, _, agreement = line.split()
    assert float(last) < 0.5 * float(first)
    assert float(agreement) > 0.8
