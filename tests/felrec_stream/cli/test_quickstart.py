"""The streaming path end to end: a topic replayed and read back trains exactly like the file."""

import dataclasses

import pytest
import torch
from click.testing import CliRunner

from felrec_stream.cli import cli
from felrec_stream.cli.cmd_quickstart import replay_and_read_back
from felrec_stream.config import CacheConfig, Configs, EncoderConfig, EvalConfig, ModelConfig, TrainingConfig
from felrec_stream.data.synthetic import SyntheticConfig, generate

pytestmark = pytest.mark.kafka

TINY = Configs(encoder=EncoderConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32),
               model=ModelConfig(queue_size=256),
               training=TrainingConfig(epochs=2, warmup_epochs=1, batch_size=128, device="cpu"),
               cache=CacheConfig(), eval=EvalConfig(batch_size=128))


def _train(events, out):
    from felrec_stream.state.checkpoint import load_checkpoint
    from training.train import train

    result = train(events, TINY, out)
    return result, load_checkpoint(result.last_checkpoint)


def test_topic_training_equals_file_training(kafka_config, topic_name, tmp_path):
    table = generate(SyntheticConfig(n_users=60, n_items=40, n_events=1500, n_clusters=4, seed=3)).events
    kafka = dataclasses.replace(kafka_config, topic=topic_name, partitions=3)
    from_topic = replay_and_read_back(table, kafka)
    assert from_topic.equals(table)  # same events, same order, same event ids

    file_result, file_ckpt = _train(table, tmp_path / "file")
    topic_result, topic_ckpt = _train(from_topic, tmp_path / "topic")
    assert [h["val_rank"] for h in topic_result.history] == [h["val_rank"] for h in file_result.history]
    for name, tensor in file_ckpt.model_state.items():
        assert torch.equal(tensor, topic_ckpt.model_state[name]), name


@pytest.mark.slow
def test_quickstart_command_runs_the_whole_path(kafka_bootstrap, topic_name, tmp_path):
    out = tmp_path / "qs"
    result = CliRunner().invoke(cli, ["quickstart", "--bootstrap-servers", kafka_bootstrap, "--topic", topic_name,
                                      "--epochs", "1", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "FELRec-Q (keep)" in result.output and "Popularity" in result.output
    assert (out / "report.md").read_text().count("|") > 20
    assert (out / "rank_vs_prior.png").stat().st_size > 1000
    assert (out / "model" / "best.pt").exists() or (out / "model" / "last.pt").exists()
