import math

import pytest

from fastres.config import ScheduleConfig
from fastres.engine.schedules import (lr_factor, momentum_at, phase2_start, total_steps,
                                      whiten_bias_factor)


def test_total_steps():
    assert total_steps(ScheduleConfig(epochs=8), 25) == 200
    assert total_steps(ScheduleConfig(epochs=9.9), 48) == math.ceil(9.9 * 48)
    assert total_steps(ScheduleConfig(epochs=1, steps=64000), 390) == 64000


def test_step_schedule_he_et_al():
    s = ScheduleConfig(steps=64000, lr_schedule="step", milestones=(0.5, 0.75), gamma=0.1)
    assert lr_factor(0, 64000, s) == 1.0
    assert lr_factor(31999, 64000, s) == 1.0
    assert lr_factor(32000, 64000, s) == pytest.approx(0.1)
    assert lr_factor(47999, 64000, s) == pytest.approx(0.1)
    assert lr_factor(48000, 64000, s) == pytest.approx(0.01)


def test_linear_to_zero_is_airbench_muon():
    s = ScheduleConfig(lr_schedule="linear", final_factor=0.0)
    assert [lr_factor(k, 200, s) for k in (0, 50, 100, 199)] == \
        pytest.approx([1.0, 0.75, 0.5, 1 - 199 / 200])


def test_cosine():
    s = ScheduleConfig(lr_schedule="cosine", final_factor=0.1)
    assert lr_factor(0, 100, s) == pytest.approx(1.0)
    assert lr_factor(50, 100, s) == pytest.approx(0.55)
    assert lr_factor(100, 100, s) == pytest.approx(0.1)


def test_triangular_airbench94():
    s = ScheduleConfig(lr_schedule="triangular", start_factor=0.2, peak=0.23, final_factor=0.07)
    assert lr_factor(0, 1000, s) == pytest.approx(0.2)
    assert lr_factor(230, 1000, s) == pytest.approx(1.0)
    assert lr_factor(115, 1000, s) == pytest.approx(0.6)
    assert lr_factor(1000, 1000, s) == pytest.approx(0.07)


def test_onecycle_is_smooth_and_peaks():
    s = ScheduleConfig(lr_schedule="onecycle", start_factor=0.04, peak=0.3, final_factor=0.0)
    values = [lr_factor(k, 100, s) for k in range(101)]
    assert values[0] == pytest.approx(0.04) and values[30] == pytest.approx(1.0)
    assert values[100] == pytest.approx(0.0) and max(values) == pytest.approx(1.0)
    assert values[15] == pytest.approx(0.04 + 0.96 * 0.5)  # half-cosine midpoint


def test_warmup_multiplies_the_shape():
    s = ScheduleConfig(lr_schedule="cosine", warmup=0.1, start_factor=0.0, final_factor=0.0)
    assert lr_factor(0, 100, s) == 0.0
    assert lr_factor(5, 100, s) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 0.05)))
    assert lr_factor(10, 100, s) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.1)))


def test_two_phase_halves_the_lr():
    s = ScheduleConfig(epochs=10, lr_schedule="constant", two_phase_epochs=2)
    p2 = phase2_start(s, 50)
    assert p2 == 400
    assert lr_factor(399, 500, s, p2) == 1.0 and lr_factor(400, 500, s, p2) == 0.5


def test_momentum_cycles_inversely():
    s = ScheduleConfig(lr_schedule="onecycle", start_factor=0.0, peak=0.5, final_factor=0.0,
                       cycle_momentum=True, momentum_range=(0.85, 0.95))
    assert momentum_at(0, 100, s, 0.9) == pytest.approx(0.95)
    assert momentum_at(50, 100, s, 0.9) == pytest.approx(0.85)
    assert momentum_at(0, 100, ScheduleConfig(), 0.9) == 0.9


def test_whiten_bias_factor():
    assert [whiten_bias_factor(k, 75) for k in (0, 30, 75, 100)] == \
        pytest.approx([1.0, 0.6, 0.0, 0.0])
