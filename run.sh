#!/usr/bin/env bash
# Quick start: install pqfs, then encrypt MEDIA (files or directories) into the local vault
# ~/pqfs-vault, list it and verify it. Without MEDIA, a short sample clip is made with ffmpeg.
# The passphrase is asked on the terminal (or taken from PQFS_PASSPHRASE).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
"$here/scripts/install.sh"
pqfs="$here/.venv/bin/pqfs"
vault="${PQFS_VAULT:-$HOME/pqfs-vault}"

media=("$@")
if [ "${#media[@]}" -eq 0 ]; then
    sample="$HOME/pqfs-sample"
    mkdir -p "$sample"
    [ -f "$sample/clip.mp4" ] || ffmpeg -loglevel error -f lavfi -i testsrc2=duration=10:size=640x360:rate=25 \
        -f lavfi -i sine=frequency=440:duration=10 -c:v libx264 -pix_fmt yuv420p -c:a aac \
        -shortest "$sample/clip.mp4"
    media=("$sample")
fi

[ -f "$vault/pqfs.json" ] || "$pqfs" init "$vault"
for m in "${media[@]}"; do
    "$pqfs" add "$vault" "$m"
done
"$pqfs" ls -lR "$vault"
"$pqfs" verify "$vault"
echo "Your vault is $vault. Try: pqfs cat $vault PATH | ffprobe -  (see README.md)"
