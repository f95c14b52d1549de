#!/usr/bin/env bash
# Quick start: install pqfs, then encrypt MEDIA (files or directories) into the local vault
# ~/pqfs-vault, list it, verify it and mount it at ~/pqfs-mount, where any player opens it.
# Without MEDIA, a short sample clip is made with ffmpeg. The passphrase is asked on the
# terminal (or taken from PQFS_PASSPHRASE).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
"$here/scripts/install.sh"
pqfs="$here/.venv/bin/pqfs"
vault="${PQFS_VAULT:-$HOME/pqfs-vault}"
mnt="${PQFS_MOUNT:-$HOME/pqfs-mount}"

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

mkdir -p "$mnt"
if grep -qs " $mnt fuse.pqfs " /proc/self/mounts; then "$pqfs" umount "$mnt"; fi
"$pqfs" mount "$vault" "$mnt"
ls -lR "$mnt"
first="$(find "$mnt" -type f \( -name '*.mp4' -o -name '*.mkv' -o -name '*.webm' -o -name '*.mp3' -o -name '*.flac' \) | head -n 1)"
if [ -n "$first" ]; then
    echo "ffprobe, reading through the mount: $first"
    ffprobe -v error -show_entries format=duration,format_name -of default=noprint_wrappers=1 "$first"
fi
echo "Your vault $vault is mounted at $mnt: open its files with any player."
echo "Unmount with: pqfs umount $mnt   (statistics: pqfs stats $mnt)"
