"""Labels back: parsing, the join to the log, per-period metrics with intervals, alerts, export, the webhook."""

import json
import socket
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pandas as pd
import pytest

from xray.errors import DatasetSourceError
from xray.monitoring import prediction_log
from xray.monitoring.alerts import post_alert
from xray.monitoring.performance import feedback

MONDAY = datetime(2026, 11, 23, 9, tzinfo=timezone.utc)  # ISO week 2026-W48


def logged(n: int, when: datetime, version="3", site="", start=0, probability=None, status="ok", source="batch"):
    probabilities = probability if probability is not None else np.linspace(0.05, 0.95, n)
    table = pd.DataFrame(
        {
            "path": [f"img/{i}.jpeg" for i in range(start, start + n)],
            "sha256": [f"{i:064x}" for i in range(start, start + n)],
            "probability": probabilities,
            "label": "",
            "threshold": 0.5,
            "ood_score": 0.1,
            "status": status,
            "reason": "",
            "study_instance_uid": "",
            "series_instance_uid": "",
            "sop_instance_uid": "",
            "site": site,
            "operating_point": "version",
            "model_version": version,
        }
    )
    return prediction_log.log_rows(table, source, "/data/batch" if source == "batch" else "", now=when)


def labels_file(tmp_path, text: str):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return path


def labels_for(log: pd.DataFrame, truth) -> pd.DataFrame:
    table = pd.DataFrame({"sha256": log["sha256"], "label": np.where(np.asarray(truth) == 1, "PNEUMONIA", "NORMAL")})
    table.attrs["key"] = "sha256"
    return table


@pytest.mark.parametrize(
    "text, message",
    [
        ("sha256,diagnosis\nab,NORMAL\n", "needs a `label` column and one of `sha256` or `sop_instance_uid`"),
        ("sha256,label\nab,NORMAL\ncd,pneumonia\nef,COVID\n", "unknown label 'COVID' on line 4"),
        ("sha256,label\n,NORMAL\n", "empty `sha256` on line 2"),
        ("sha256,label,read_at\nab,NORMAL,yesterday-ish\n", "read_at 'yesterday-ish' is not a date and time"),
        ("\x00\x01\x02", "needs a `label` column"),
    ],
)
def test_a_malformed_labels_file_is_one_clear_line(tmp_path, text, message):
    with pytest.raises(DatasetSourceError, match=message) as error:
        feedback.read_labels(labels_file(tmp_path, text))
    assert "\n" not in str(error.value) and str(error.value).startswith("labels labels.csv:")


def test_labels_in_either_key_with_read_at_and_conflicts_left_out_and_counted(tmp_path):
    table = feedback.read_labels(
        labels_file(
            tmp_path,
            "SOP_Instance_UID;Label;read_at\n1.2.3;normal;2026-11-24T10:00:00Z\n1.2.4;PNEUMONIA;\n"
            "1.2.5;NORMAL;\n1.2.5;PNEUMONIA;\n",
        )
    )
    assert table.attrs["key"] == "sop_instance_uid" and table.attrs["conflicting"] == ["1.2.5"]
    assert table["sop_instance_uid"].tolist() == ["1.2.3", "1.2.4"]
    assert table["read_at"].iloc[0] == pd.Timestamp("2026-11-24T10:00:00Z") and pd.isna(table["read_at"].iloc[1])


def test_periods_are_utc_days_iso_weeks_and_months():
    times = pd.Series(pd.to_datetime(["2026-12-31T23:30:00Z", "2027-01-01T00:30:00Z", "2027-01-04T08:00:00Z"]))
    assert feedback.period_of(times, "week").tolist() == ["2026-W53", "2026-W53", "2027-W01"]
    assert feedback.period_of(times, "day").tolist() == ["2026-12-31", "2027-01-01", "2027-01-04"]
    assert feedback.period_of(times, "month").tolist() == ["2026-12", "2027-01", "2027-01"]


def test_each_label_meets_the_latest_prediction_of_each_version_and_unmatched_are_counted():
    first = logged(4, MONDAY, probability=[0.9, 0.9, 0.9, 0.9])
    rerun = logged(4, MONDAY + timedelta(hours=1), probability=[0.1, 0.1, 0.1, 0.1])  # the same images again
    other_version = logged(4, MONDAY, version="4", probability=[0.8, 0.8, 0.8, 0.8])
    log = pd.concat([first, rerun, other_version], ignore_index=True)
    labels = labels_for(first, [1, 1, 0, 0])
    labels = pd.concat([labels, pd.DataFrame({"sha256": ["f" * 64], "label": ["NORMAL"]})], ignore_index=True)
    labels.attrs["key"] = "sha256"
    joined = feedback.join(labels, log)
    assert joined.unmatched == 1 and joined.labels == 5 and len(joined.rows) == 8
    v3 = joined.rows[joined.rows["model_version"] == "3"]
    assert (v3["probability"] == 0.1).all(), "the rerun's answers, not the first run's"
    assert set(joined.rows["period"]) == {"2026-W48"}
    assert len(feedback.join(labels, log.assign(site="north"), site="south").rows) == 0


def test_metrics_per_period_with_wilson_and_bootstrap_intervals():
    low, high = feedback.wilson(8, 10)
    assert (round(low, 3), round(high, 3)) == (0.49, 0.943)
    # Week 48: 10 PNEUMONIA (8 called), 10 NORMAL (9 cleared); week 49: all right; one unreadable in week 49.
    week48 = logged(20, MONDAY, probability=[0.9] * 8 + [0.2] * 2 + [0.1] * 9 + [0.7])
    week49 = logged(21, MONDAY + timedelta(days=7), start=100, probability=[0.9] * 10 + [0.1] * 11)
    week49.loc[20, "status"] = "unreadable"
    log = pd.concat([week48, week49], ignore_index=True)
    truth = [1] * 10 + [0] * 10 + [1] * 10 + [0] * 11
    table = feedback.performance(feedback.join(labels_for(log, truth), log), samples=200)
    first, second = table.iloc[0], table.iloc[1]
    assert first["period"] == "2026-W48" and second["period"] == "2026-W49"
    assert first["sensitivity"] == 0.8 and first["specificity"] == 0.9
    assert (first["positives"], first["negatives"], first["answered"]) == (10, 10, 20)
    assert first["sensitivity_low"] < 0.8 < first["sensitivity_high"]
    assert first["auc_low"] <= first["auc"] <= first["auc_high"] and 0 <= first["ece"] <= 1
    assert second["sensitivity"] == 1.0 and second["answered"] == 20 and second["labelled"] == 21
    assert second["share_unreadable"] == pytest.approx(1 / 21) and second["share_out_of_distribution"] == 0


def test_a_drop_in_one_week_alerts_naming_metric_period_and_site_and_a_small_period_never_does():
    good = logged(60, MONDAY, site="north", probability=[0.9] * 30 + [0.1] * 30)
    bad = logged(60, MONDAY + timedelta(days=7), site="north", start=100, probability=[0.9] * 12 + [0.1] * 48)
    tiny = logged(6, MONDAY + timedelta(days=14), site="north", start=200, probability=[0.1] * 6)
    log = pd.concat([good, bad, tiny], ignore_index=True)
    truth = [1] * 30 + [0] * 30 + [1] * 30 + [0] * 30 + [1, 1, 1, 0, 0, 0]
    table = feedback.performance(feedback.join(labels_for(log, truth), log), samples=200)
    alerts = feedback.degradations(table, min_sensitivity=0.95, test_auc={"3": 0.97}, margin=0.01, min_per_class=20)
    assert len(alerts) == 2, alerts
    assert alerts[0].startswith("sensitivity degraded in period 2026-W49, site north, v3: 0.400")
    assert alerts[1].startswith("AUC degraded in period 2026-W49, site north, v3")
    assert not any("2026-W48" in line or "2026-W50" in line for line in alerts), "the good and the tiny week"
    # Without a recorded test AUC, only sensitivity can alert.
    assert len(feedback.degradations(table, 0.95, {}, 0.01, 20)) == 1


def test_a_week_of_missed_pneumonia_alerts_on_sensitivity_though_it_has_few_negatives():
    """The issue's week: 41 labelled PNEUMONIA of which the model called 21 (sensitivity 0.51, 95% CI 0.36-0.66) and
    4 NORMAL. Sensitivity is computed on the PNEUMONIA answers alone, so it alerts; AUC needs 20 of each and does
    not; a week of 19 PNEUMONIA does not alert either."""
    probabilities = [0.9] * 21 + [0.1] * 20 + [0.95, 0.95, 0.5, 0.05]  # AUC 0.38
    log = logged(45, MONDAY, probability=probabilities)
    table = feedback.performance(feedback.join(labels_for(log, [1] * 41 + [0] * 4), log), samples=200)
    week = table.iloc[0]
    assert (week["positives"], week["negatives"]) == (41, 4)
    assert (round(week["sensitivity"], 2), round(week["sensitivity_low"], 2), round(week["sensitivity_high"], 2)) == (
        0.51,
        0.36,
        0.66,
    )
    assert week["auc"] < 0.5  # and yet too few negatives for an AUC alert
    alerts = feedback.degradations(table, min_sensitivity=0.95, test_auc={"3": 0.97}, margin=0.01, min_per_class=20)
    assert alerts == [
        "sensitivity degraded in period 2026-W48, site (none), v3: 0.512 (95% CI 0.365-0.657, 41 PNEUMONIA) is "
        "below evaluate.min_sensitivity 0.95"
    ]
    few = logged(23, MONDAY, probability=[0.1] * 19 + [0.8] * 4)
    small = feedback.performance(feedback.join(labels_for(few, [1] * 19 + [0] * 4), few), samples=200)
    assert feedback.degradations(small, 0.95, {"3": 0.97}, 0.01, 20) == []


def test_labelled_batch_images_export_as_sources_and_serving_ones_are_counted():
    batch = logged(4, MONDAY)
    dicom = logged(2, MONDAY, start=10).assign(input="dicomweb://pacs/dicom-web", sop_instance_uid=["1.2.3", "1.2.4"])
    serving = logged(3, MONDAY, start=20, source="serving")
    log = pd.concat([batch, dicom, serving], ignore_index=True)
    joined = feedback.join(labels_for(log, [1, 0] * 4 + [1]), log)
    sources, without_image = feedback.export_sources(joined.rows, joined.key)
    assert without_image == 3
    assert list(sources["/data/batch"].columns) == ["file", "label"] and len(sources["/data/batch"]) == 4
    assert sources["dicomweb://pacs/dicom-web"]["sop_instance_uid"].tolist() == ["1.2.3", "1.2.4"]


def test_an_alert_is_posted_to_a_webhook_and_a_failing_one_names_only_its_host(monkeypatch, caplog):
    received = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server API
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("XRAY_ALERT_WEBHOOK", f"http://127.0.0.1:{server.server_port}/hooks/T0/secret-token")
        assert post_alert("sensitivity degraded in period 2026-W49")
        assert received == [{"text": "sensitivity degraded in period 2026-W49"}]
    finally:
        server.shutdown()
        server.server_close()
    assert not post_alert("x", url=f"http://127.0.0.1:{server.server_port}/hooks/T0/secret-token", timeout_s=2)
    assert "127.0.0.1" in caplog.text and "secret-token" not in caplog.text
    monkeypatch.delenv("XRAY_ALERT_WEBHOOK")
    assert post_alert("nobody listens") is False


def test_the_webhook_posts_only_over_http_follows_no_redirect_and_times_out(monkeypatch, caplog, tmp_path):
    """A redirect (to another host, or anywhere) is refused, not followed; file:// and other schemes are refused
    before any request; a webhook that never answers ends after the timeout."""
    hits = {"moved": 0, "target": 0}

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server API
            self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == "/moved":
                hits["moved"] += 1
                self.send_response(307)
                self.send_header("Location", f"http://localhost:{self.server.server_port}/target")
            else:
                hits["target"] += 1
                self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts, never answers
    try:
        assert not post_alert("x", url=f"http://127.0.0.1:{server.server_port}/moved")
        assert hits == {"moved": 1, "target": 0} and "redirect to localhost refused" in caplog.text
        secret = tmp_path / "secret.txt"
        secret.write_text("s3cr3t")
        for url in (f"file://{secret}", "ftp://127.0.0.1/x", "gopher://127.0.0.1/x", "127.0.0.1:80/x"):
            assert not post_alert("x", url=url)
        assert "must be an http:// or https:// URL" in caplog.text
        caplog.clear()
        assert not post_alert("x", url=f"http://127.0.0.1:{silent.getsockname()[1]}/hook", timeout_s=1)
        assert "TimeoutError" in caplog.text  # ended by its own timeout
    finally:
        server.shutdown()
        server.server_close()
        silent.close()
