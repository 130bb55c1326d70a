"""GRU4Rec on the real YooChoose sample beats popularity by a clear margin (a test, not a benchmark)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "yoochoose_rsc15_100k"
TRAIN = DATA / "yoochoose-clicks-100k_train_full.txt"
TEST = DATA / "yoochoose-clicks-100k_test.txt"
OFFICIAL = ("loss=cross-entropy,constrained_embedding=True,embedding=0,elu_param=0,layers=100,n_epochs=5,"
            "batch_size=48,dropout_p_embed=0.0,dropout_p_hidden=0.2,learning_rate=0.07,momentum=0.0,"
            "n_sample=2048,sample_alpha=0.2,bpreg=0.0,logq=1.0")


@pytest.mark.slow
@pytest.mark.skipif(not (TRAIN.exists() and TEST.exists()), reason=f"YooChoose sample not found under {DATA}")
def test_gru_beats_popularity_on_yoochoose_sample() -> None:
    from model.baselines import evaluate_baseline
    from model.data import load_events
    from model.evaluate import evaluate
    from model.params import GRU4RecParams
    from model.train import train_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train, test = load_events(TRAIN, "session-rec"), load_events(TEST, "session-rec")
        params = GRU4RecParams.parse(OFFICIAL + ",n_epochs=2")  # fewer epochs keep the test near a minute
        net, vocab, _ = train_model(train, params, progress=False)
        gru = evaluate(net, vocab, test)
        pop = evaluate_baseline("popularity", train, test)
        cooc = evaluate_baseline("cooccurrence", train, test, tie="conservative")
    finally:
        torch.set_num_threads(threads)
    print({"gru": gru, "popularity": pop, "cooccurrence": cooc})
    assert gru["n_events"] == pop["n_events"] > 10_000 - 500
    assert gru["recall"]["20"] > pop["recall"]["20"] + 0.4
    assert gru["mrr"]["20"] > pop["mrr"]["20"] + 0.2
    # and it is at least in the league of the simple sequential baseline
    assert gru["recall"]["20"] > cooc["recall"]["20"]
