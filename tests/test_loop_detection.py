"""The signals that mark a machine's mail, and their policy in `[limits]` (no servers)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from support import desk_config

from mailflow.config import LimitSettings, load_config
from mailflow.errors import ConfigError
from mailflow.loop_detection import (
    Evidence,
    Written,
    answered,
    counted,
    judge,
    letters,
    regular,
    similarity,
    written_at,
)

T = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)
LIMITS = LimitSettings()


def minutes(m: float) -> datetime:
    return T + timedelta(minutes=m)


def test_a_mail_is_placed_when_it_was_written_clipped_to_its_arrival():
    arrived = minutes(60)
    assert written_at(minutes(10), arrived, LIMITS) == minutes(10)
    assert written_at(minutes(90), arrived, LIMITS) == arrived, "a future Date is clipped"
    assert written_at(None, arrived, LIMITS) == arrived
    assert written_at(T - timedelta(days=400), arrived, LIMITS) == arrived - timedelta(days=7)


def test_subjects_with_a_counter():
    assert counted("Your request #1001 has been received", "Your request #1002 has been received")
    assert counted("Re: 工单 77 已受理", "工单 78 已受理")
    assert not counted("Thank you for your message", "Thank you for your message")
    assert not counted("打印机坏了", "显示器坏了")


def test_similarity_of_normalised_text():
    a = letters("Request #1001 logged on 2026-11-24 10:00. We will call you.")
    b = letters("Request #1002 logged on 2026-11-24 10:15. We will call you.")
    assert similarity(a, b) == 1.0, "numbers and punctuation aside"
    assert similarity(letters("三楼打印机一直卡纸"), letters("VPN 连接提示错误 809")) < 0.2


def test_regular_timing():
    assert regular([minutes(m) for m in (0, 15, 30, 45)], 0.1)
    assert not regular([minutes(m) for m in (0, 3, 10, 14)], 0.1)
    assert not regular([minutes(m) for m in (0, 15, 30)], 0.1), "three intervals needed"


def test_a_mail_cannot_answer_our_mail_sent_after_it_arrived():
    sent = [minutes(0)]
    assert answered(Written(minutes(15), minutes(15), "", ""), sent, LIMITS.answer_window)
    assert answered(Written(minutes(-1), minutes(0), "", ""), sent, LIMITS.answer_window) is None
    assert answered(Written(minutes(45), minutes(45), "", ""), sent, LIMITS.answer_window) is None


def _mail(m: float, subject: str, text: str) -> Written:
    return Written(minutes(m), minutes(m), subject, text)


ACK = "Thank you for contacting Other Corp IT support. Your request has been logged as #{}."


def test_a_desk_answering_every_mail_of_ours_is_a_machine_at_its_second_answer():
    sent = [minutes(0), minutes(16)]  # our acks of the first mail and of its first answer
    first = _mail(-5, "Printer on floor 3 is broken", "It prints nothing, error 50.4.")
    answer1 = _mail(15, "Your request #1001 has been received", ACK.format(1001))
    answer2 = _mail(31, "Your request #1002 has been received", ACK.format(1002))
    assert judge(Evidence(answer1, [first], sent[:1], LIMITS), new=True).machine is None
    verdict = judge(Evidence(answer2, [answer1, first], sent, LIMITS), new=True)
    assert verdict.machine and verdict.quiet
    assert "subject repeats with a counter" in verdict.machine


def test_a_person_writing_often_and_quickly_is_not_a_machine():
    sent = [minutes(m + 0.5) for m in (0, 15, 30)]
    reports = [_mail(0, "打印机卡纸", "三楼东侧的打印机一直卡纸。"),
               _mail(15, "无法连接VPN", "在家连接时提示服务器无响应。"),
               _mail(30, "显示器闪屏", "工位 305 的显示器每隔几分钟黑屏一次。")]
    mail = _mail(45, "共享盘 Z 盘打不开", "双击 Z 盘提示找不到网络路径。")
    verdict = judge(Evidence(mail, reports[::-1], sent, LIMITS), new=True)
    assert verdict.machine is None and verdict.quiet is None, "regular and quick, yet a person"


def test_an_answer_at_machine_speed_gets_no_automatic_reply_but_is_no_machine_yet():
    verdict = judge(Evidence(_mail(1, "Thanks", "We will answer soon."), [], [T], LIMITS), True)
    assert verdict.quiet and "loop_window" in verdict.quiet and verdict.machine is None


def test_machine_signals_are_policy(tmp_path):
    weights = {"answered_before": 0, "same_text": 3}
    settings = load_config(desk_config(tmp_path, limits={"machine_signals": weights}))
    assert dict(settings.limits.machine_signals) == {
        "answered_before": 0, "same_text": 3, "counted_subject": 1, "regular_timing": 1}
    with pytest.raises(ConfigError, match="limits.machine_signals"):
        load_config(desk_config(tmp_path, limits={"machine_signals": {"typing_speed": 1}}))
    with pytest.raises(ConfigError, match="limits.same_text"):
        load_config(desk_config(tmp_path, limits={"same_text": 1.5}))
