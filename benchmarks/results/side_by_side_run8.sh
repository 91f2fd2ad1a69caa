# How RESULTS §5 run 8 and its side-by-side were run (2026-12-02): /tmp/base was a git worktree
# of commit 4eee082 (the code before), /tmp/prof a scratch folder, /tmp/crops1024 from tools/make_photos.py.
cd /work/main
python benchmarks/memory_time.py --images /tmp/crops1024 --counts 64,1024 \
  --tools "onnx-dwd --rank 1 --no-latency,onnx-dwd --rank 1 --no-latency --no-inter-layer,ort quantize_static" \
  --json benchmarks/results/memory_time_run8.json > benchmarks/results/memory_time_run8.log 2>&1
echo bench-done
# side by side: the code before this session (4eee082, /tmp/base) and now, rank 1, 1024 images
for tree in /tmp/base /work/main /tmp/base /work/main; do
  cd /tmp/prof && /usr/bin/time -f "$tree %e s %M KB" env PYTHONPATH=$tree python -c "
import sys; sys.argv=['onnx-dwd','optimize','$(python /work/main/tools/real_models.py yolov8n)','/tmp/prof/sbs.onnx','--calib','/tmp/crops1024','--input-shape','images:1,3,320,320','--rank','1','--no-latency','-q','--report','/tmp/prof/sbs.json']
import onnx_dwd, json; print(onnx_dwd.__file__)
from onnx_dwd.cli import main
try: main()
except SystemExit: pass
print(json.load(open('/tmp/prof/sbs.json'))['model']['validation']['outputs']['output0']['rel_error'])
"
done
echo sbs-done
