# How the side-by-side of RESULTS §5 run 9 was run (2026-12-02): /tmp/base a git worktree of
# 4694c25 (the code before this session), /tmp/cur one of the commit measured, /tmp/prof a scratch
# folder, /tmp/crops1024 from tools/make_photos.py. Called as: bash side_by_side_run9.sh /tmp/base /tmp/cur /tmp/base /tmp/cur
cd /tmp/prof
M=$(python /work/main/tools/real_models.py yolov8n)
N=${N:-1024}
for tree in "$@"; do
  /usr/bin/time -f "$tree %e s %M KB" env PYTHONPATH=$tree python -c "
import sys; sys.argv=['onnx-dwd','optimize','$M','/tmp/prof/sbs.onnx','--calib','/tmp/crops1024','--max-images','$N','--input-shape','images:1,3,320,320','--rank','1','--no-latency','-q','--report','/tmp/prof/sbs.json']
from onnx_dwd.cli import main
try: main()
except SystemExit: pass
import json; print(json.load(open('/tmp/prof/sbs.json'))['model']['validation']['outputs']['output0']['rel_error'])
"
done
