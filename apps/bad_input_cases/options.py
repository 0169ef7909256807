"""Bad-input rows about option values (erasers.inputs): out of range, not finite, not a multiple of 16, not a
number, refused by the argparse type before anything loads; the app's address checked before its models load;
attack tokens that do not fit the text encoder's context, refused before any image is drawn."""

from __future__ import annotations

import socket

from apps.bad_input_fixtures import fixture
from apps.bad_inputs import Case

_LISTENING: list[socket.socket] = []  # kept open while the process runs, so the port stays taken


@fixture
def busy_port(root):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    _LISTENING.append(listener)
    return str(listener.getsockname()[1])


CANVAS = "bench unlearncanvas --model toy --data {root} --classifier {root} --out {root}/r"
I2P = "bench i2p --prompts {toy_i2p_csv} --out {root}/r"

CASES = [
    # generate: the same limits as the app's
    Case("options: generate --steps 1001", "generate --prompt a --steps 1001 --out {root}/a.png", "--steps"),
    Case("options: generate --steps 2.5", "generate --prompt a --steps 2.5 --out {root}/a.png", "not an integer"),
    Case("options: generate --guidance -1", "generate --prompt a --guidance -1 --out {root}/a.png", "--guidance"),
    Case("options: generate --guidance 1e400", "generate --prompt a --guidance 1e400 --out {root}/a.png",
         "not a finite number"),
    Case("options: generate --guidance x", "generate --prompt a --guidance x --out {root}/a.png", "not a number"),
    Case("options: generate --scale 65", "generate --prompt a --scale 65 --out {root}/a.png", "at most 64"),
    # erase and attack: image sides
    Case("options: erase --resolution 7", "erase --method esd-x --concept star --resolution 7 --out {root}/e",
         "multiple of 16"),
    Case("options: erase --resolution 100000", "erase --method esd-x --concept star --resolution 100000 "
         "--out {root}/e", "at most 4096"),
    Case("options: attack --resolution 7", "attack --edit {edit_ok} --resolution 7 --out {root}/a", "--resolution"),
    Case("options: attack --resolution 0", "attack --edit {edit_ok} --resolution 0 --out {root}/a", "at least 16"),
    Case("options: attack --tokens 500", "attack --edit {edit_ok} --tokens 500 --out {root}/a", "does not fit"),
    Case("options: erase fmn inversion with the text stage", "erase --method fmn --concept arrow --set inversion=true "
         "--out {root}/e", "inversion and text_steps do not combine"),
    Case("options: erase fmn --preserve with nothing that keeps it", "erase --method fmn --concept arrow --preserve "
         "circle --set text_steps=0 --set preserve_weight=0 --out {root}/e", "fmn keeps --preserve prompts only"),
    Case("options: erase advunlearn attack_tokens=500", "erase --method advunlearn --concept star "
         "--set attack_tokens=500 --out {root}/e", "does not fit"),
    Case("options: attack --prompts -1", "attack --edit {edit_ok} --prompts -1 --out {root}/a", "--prompts"),
    # benchmarks
    Case("options: bench i2p --limit 0", f"{I2P} --limit 0", "--limit"),
    Case("options: bench i2p --limit -3", f"{I2P} --limit -3", "--limit"),
    Case("options: bench i2p --threshold 0", f"{I2P} --threshold 0", "--threshold"),
    Case("options: bench i2p --threshold 1.5", f"{I2P} --threshold 1.5", "--threshold"),
    Case("options: bench i2p --threshold nan", f"{I2P} --threshold nan", "not a finite number"),
    Case("options: bench i2p --batch-size 0", f"{I2P} --batch-size 0", "--batch-size"),
    Case("options: bench toycanvas --processes 0", "bench toycanvas --processes 0 --out {root}/r", "--processes"),
    Case("options: bench toycanvas --batch-size -4", "bench toycanvas --batch-size -4 --out {root}/r",
         "--batch-size"),
    Case("options: bench unlearncanvas --steps 0", f"{CANVAS} --steps 0", "--steps"),
    Case("options: bench unlearncanvas --guidance inf", f"{CANVAS} --guidance inf", "--guidance"),
    Case("options: bench unlearncanvas --size 500", f"{CANVAS} --size 500", "multiple of 16"),
    Case("options: bench unlearncanvas --fid-reference-per-pair -1", f"{CANVAS} --fid-reference-per-pair -1",
         "--fid-reference-per-pair"),
    Case("options: bench unlearncanvas --seeds -1", f"{CANVAS} --seeds -1", "2**63 - 1"),
    # the app: its address before any model loads, never a message about disk space
    Case("options: app --host that does not resolve", "app --host nosuch.invalid", "--host"),
    Case("options: app --host not of this machine", "app --host 192.0.2.1 --output {root}/o",
         "not an address of this machine"),
    Case("options: app --port in use", "app --port {busy_port} --output {root}/o", "is in use"),
    Case("options: app --port x", "app --port x", "not an integer"),
]
