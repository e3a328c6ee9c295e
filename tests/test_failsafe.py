"""When a failing training loop saves its last step (rwkvunet_jax.train.failsafe)."""

from __future__ import annotations

from rwkvunet_jax.train.failsafe import IteratorSnapshot, checkpoint_before_raising


def _call(**overrides):
    saved = []
    kwargs = dict(step=7, start_step=0, latest_saved=4, save=lambda: saved.append(7))
    kwargs.update(overrides)
    result = checkpoint_before_raising(KeyboardInterrupt(), **kwargs)
    return result, saved


def test_saves_the_last_completed_step_once():
    assert _call() == (True, [7])
    assert _call(latest_saved=None) == (True, [7])


def test_nothing_to_save():
    assert _call(step=3, start_step=3) == (False, [])  # no step ran since the start or the resume
    assert _call(latest_saved=7) == (False, [])  # that step is already written (or being written)
    assert _call(poisoned=True) == (False, [])  # non-finite weights would poison the resume


def test_several_processes_save_only_errors_they_all_raise():
    assert _call(process_count=4) == (False, [])
    assert _call(process_count=4, collective=True) == (True, [7])


def test_a_failing_save_is_logged_and_does_not_replace_the_error(caplog):
    def broken():
        raise RuntimeError("disk full")

    assert _call(save=broken) == (False, [])
    assert "disk full" in caplog.text


def test_iterator_snapshot_keeps_the_state_of_its_moment():
    class It:
        state = {"position": 1}

        def get_state(self):
            return self.state

    it = It()
    snap = IteratorSnapshot(it)
    it.state["position"] = 2
    assert snap.get_state() == {"position": 1}
