#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# The ego-ros command end to end, offline, on a tiny random Qwen2.5-VL (real plumbing, gibberish answers):
# build the model folder, draw two pictures, register a concept, list it, ask about it, recognise it, and draw
# what its memory kept. Everything goes to build/demo/.
#
#   bash scripts/demo.sh
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${EGO_ROS_VENV:-$repo/.venv}
out=$repo/build/demo
bash "$repo/scripts/setup.sh"
mkdir -p "$out"
export PATH=$venv/bin:$PATH EGO_ROS_MODEL=$out/tiny-qwen2_5_vl EGO_ROS_MEMORY_DIR=$out/memory
run() { echo; echo "\$ $*"; "$@"; }

[[ -f $EGO_ROS_MODEL/config.json ]] || python -m ego_ros.testing.tiny_model --arch qwen2_5_vl "$EGO_ROS_MODEL"
python - "$out" <<'PY'
import sys
from PIL import Image, ImageDraw
out = sys.argv[1]
for name, (x, y), colour in [("mug_front", (180, 150), (40, 90, 200)), ("kitchen", (420, 260), (40, 90, 200))]:
    image = Image.new("RGB", (640, 480), (214, 200, 170))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 330, 640, 480), fill=(120, 84, 50))                     # a table
    draw.rectangle((x, y, x + 110, y + 150), fill=colour)                      # the mug
    draw.arc((x + 90, y + 30, x + 150, y + 110), -90, 90, fill=colour, width=14)  # its handle
    image.save(f"{out}/{name}.png")
PY
rm -rf "$EGO_ROS_MEMORY_DIR"
run ego-ros register "my mug" "$out/mug_front.png"
run ego-ros list
run ego-ros ask "Where is my mug?" --image "$out/kitchen.png" --max-new-tokens 12
run ego-ros recognize "$out/kitchen.png"
run ego-ros show "my mug" --out "$out/my_mug.png"
