"""The request form read from `key: value` lines (Chinese and English)."""

from __future__ import annotations

from mailflow import forms


def test_chinese_fields_with_full_width_colons_and_list_markers():
    form = forms.parse(
        "您好，申请一台笔记本电脑。\n"
        "1. 申请类型：硬件领用\n"
        "2、行类型： 办公设备\n"
        "- 项类型：笔记本电脑\n"
        "（4）申请原因：出差使用\n"
        "• 仓库：三号仓库\n"
        "收货人位置:B座3楼\n"
        "关联事件：INC-12，关联 inc - 15\n"
        "谢谢！"
    )
    assert form.fields == {
        "request_type": "硬件领用",
        "line_type": "办公设备",
        "item_type": "笔记本电脑",
        "reason": "出差使用",
        "receiving_location": "三号仓库",
        "consignee_location": "B座3楼",
        "related": "INC-12，关联 inc - 15",  # values as written: full-width kept
    }
    assert form.links == ["INC-12", "INC-15"]
    assert form.prose == "您好，申请一台笔记本电脑。\n谢谢！"


def test_english_fields_any_case_and_spacing():
    form = forms.parse(
        "Request Type: software\nITEM TYPE : Visio\nreason:   draw charts\n"
        "Receiving location: HQ store\nConsignee_location: Room 301\nRelated changes: CHG-7"
    )
    assert form.fields["request_type"] == "software"
    assert form.fields["item_type"] == "Visio"
    assert form.fields["reason"] == "draw charts"
    assert form.fields["receiving_location"] == "HQ store"
    assert form.fields["consignee_location"] == "Room 301"
    assert form.links == ["CHG-7"]
    assert form.prose == ""


def test_blank_values_prose_and_look_alikes_are_not_fields():
    form = forms.parse(
        "申请原因：\n"  # a line of the fill-in template left empty
        "收货地点：   \n"
        "On Tue, 24 Nov 2026 at 10:00, Zhang San wrote:\n"
        "http://intranet.example.test/form\n"
        "时间：明天上午\n"
    )
    assert form.fields == {}
    assert "wrote:" in form.prose and "时间：明天上午" in form.prose


def test_a_repeated_field_keeps_both_values():
    form = forms.parse("关联事件：INC-1\n关联变更：CHG-2")
    assert form.fields["related"] == "INC-1; CHG-2"
    assert form.links == ["INC-1", "CHG-2"]


def test_request_types_named_in_the_requesters_words():
    known = {"default", "hardware", "vpn-special"}
    assert forms.request_type_of("硬件", known) == "hardware"
    assert forms.request_type_of("  Hardware ", known) == "hardware"
    assert forms.request_type_of("VPN-Special", known) == "vpn-special"
    assert forms.request_type_of("账号", known) == "account"
    assert forms.request_type_of("default", known) is None
    assert forms.request_type_of("办公用品", known) is None


def test_merge_and_missing():
    stored = {"reason": "出差", "links": ["INC-1"]}
    merged = forms.merge(stored, forms.parse("收货地点：三号仓库\n关联事件：INC-1, REQ-4"))
    assert merged == {"reason": "出差", "receiving_location": "三号仓库",
                      "related": "INC-1, REQ-4", "links": ["INC-1", "REQ-4"]}
    assert stored == {"reason": "出差", "links": ["INC-1"]}, "the stored form is not mutated"
    required = ("request_type", "reason", "receiving_location", "consignee_location")
    assert forms.missing(merged, required) == ["request_type", "consignee_location"]
    assert forms.missing({**merged, "request_type": " "}, ("request_type",)) == ["request_type"]


def test_every_field_has_a_label_and_fill_in_keys_parse_back():
    for name in forms.FIELDS:
        assert name in forms.LABELS
        for key in (forms.FILL_IN[name], forms.FILL_IN_EN[name]):
            assert forms.parse(f"{key}：x").fields == {name: "x"}


def test_a_word_table_a_wrapped_reason_and_a_forwarded_form():
    # html_to_text writes a table's cells joined by "|", with or without the label's colon.
    form = forms.parse("申请类型：| 硬件\n项类型 | 显示器\n| 收货地点 | 三号仓库 |\n说明 | 无")
    assert form.fields == {
        "request_type": "硬件", "item_type": "显示器", "receiving_location": "三号仓库"
    }
    assert form.prose == "说明 | 无"
    # A reason goes on over the lines a mail client wrapped, up to a blank line or a field.
    form = forms.parse(
        "申请原因：因新员工入职，需要开通\n营销系统业扩模块查询权限。\n收货地点：三号仓库\n\n谢谢"
    )
    assert form.fields["reason"] == "因新员工入职，需要开通\n营销系统业扩模块查询权限。"
    assert form.prose == "谢谢"
    # Fields only in the forwarded mail fill the gaps; the new text's own fields win.
    form = forms.parse("请帮忙办理。\n收货地点：二号仓库", "申请类型：硬件\n收货地点：三号仓库")
    assert form.fields == {"receiving_location": "二号仓库", "request_type": "硬件"}
    assert form.prose == "请帮忙办理。"
