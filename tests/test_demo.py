"""`mailflow demo` runs the whole conversation with no outside server."""

from __future__ import annotations

from mailflow.demo import Demo


def test_demo_conversation_reaches_the_expected_tickets(tmp_path):
    lines: list[str] = []
    assert Demo(tmp_path, say=lines.append).run() == 0
    tickets = {line.split()[0]: line.split()[1] for line in lines if line.startswith("  INC-")
               or line.startswith("  REQ-")}
    assert tickets == {"INC-1": "closed", "INC-2": "open", "REQ-1": "closed"}
    text = "\n".join(lines)
    assert "【重大事件】" in text
    assert "[INC-1] 工单已关闭" in text
