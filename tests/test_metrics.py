from benchmarks.metrics import Record, unlearncanvas_scores


def test_unlearncanvas_scores_on_known_readouts():
    records = [
        Record("star", "Dots", "circle", "Dots"),     # erased object, no longer read as star: counts for UA
        Record("star", "Flat", "star", "Flat"),       # erased object still drawn: against UA
        Record("circle", "Dots", "circle", "Dots"),   # retained, right object and style
        Record("square", "Flat", "circle", "Hatch"),  # retained, both wrong
    ]
    scores = unlearncanvas_scores(records, ["star"], "object")
    assert scores == {"UA": 0.5, "IRA": 0.5, "CRA": 0.5}
    style_scores = unlearncanvas_scores(records, ["Dots"], "style")
    assert style_scores["UA"] == 0.0 and style_scores["IRA"] == 0.5 and style_scores["CRA"] == 0.5
