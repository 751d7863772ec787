#!/usr/bin/env bash
# The main job: set up a fresh Debian 12 machine (as root), build the plugin, and restore the
# public-domain 1906 French Grand Prix film at scale=2 with the embedded dpir-nano model, plus a
# before/after side-by-side. Results land in out/.
set -euo pipefail
cd "$(dirname "$0")/.."
# python-nbsphinx-doc ships the film; plugins-base-apps gives gst-discoverer-1.0.
bash tests/setup-debian.sh python-nbsphinx-doc gstreamer1.0-plugins-base-apps
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/gst-dpir-target}"
cargo build --release --locked
export GST_PLUGIN_PATH="$CARGO_TARGET_DIR/release${GST_PLUGIN_PATH:+:$GST_PLUGIN_PATH}"
gst-inspect-1.0 dpirrestore >/dev/null
film=/usr/share/doc/python-nbsphinx/html/www/wikimediacommons/Shepard_Calais_1906_FrenchGP.ogv
[ -e "$film" ] || film=$(dpkg -L python-nbsphinx-doc | grep -m1 'Shepard_Calais_1906_FrenchGP.*ogv$')
mkdir -p out
start=$(date +%s)
# -m prints the dpir-progress messages (frame, fps, ETA) as they come.
GST_LAUNCH_OPTS=-m pipelines/restore-film.sh "$film" out/calais-1906-restored.mp4 scale=2 2>&1 | \
  stdbuf -oL grep --line-buffered -E "dpir-progress|ERROR|Execution ended" | \
  stdbuf -oL sed -E 's/.*frame-index=\(guint64\)([0-9]+).*fps=\(double\)([0-9.]+).*/frame \1, \2 frames\/s/'
echo "restored in $(( $(date +%s) - start )) s"
pipelines/side-by-side.sh "$film" out/calais-1906-restored.mp4 out/calais-1906-side-by-side.mp4 >/dev/null
ls -l out/calais-1906-restored.mp4 out/calais-1906-side-by-side.mp4
