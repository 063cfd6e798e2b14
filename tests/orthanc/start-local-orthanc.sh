#!/usr/bin/env bash
# Start a real Orthanc PACS with its DICOMweb plugin (Debian packages `orthanc`, `orthanc-dicomweb`)
# for tests/test_dicom_export.py, which sends DICOM SEG + SR there over STOW-RS and finds them by QIDO-RS.
#
#   tests/orthanc/start-local-orthanc.sh            # then: export GLANDPET_ORTHANC_URL=http://127.0.0.1:8042/dicom-web
#
# No systemd: the configuration, database and storage go to a fresh temporary folder (ORTHANC_DIR,
# default `mktemp -d`), Orthanc runs in the background (pid in $ORTHANC_DIR/orthanc.pid, log in
# $ORTHANC_DIR/orthanc.log). Local use only: HttpBindAddresses 127.0.0.1 (Orthanc >= 1.12.10; older
# versions, e.g. Debian 12's 1.10, ignore it and listen on all interfaces) and RemoteAccessAllowed
# false (Orthanc answers HTTP only to clients on this host), no authentication, the DICOM (DIMSE)
# port off. Port: ORTHANC_PORT
# (default 8042). Running it again with an Orthanc answering on the port only re-checks it.
set -euo pipefail

log() { echo "[local-orthanc] $*"; }
die() { echo "[local-orthanc] ERROR: $*" >&2; exit 1; }

PORT=${ORTHANC_PORT:-8042}
URL="http://127.0.0.1:${PORT}/dicom-web"

answers() {
    python3 - "$URL" <<'PY'
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1] + "/studies", timeout=2) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
PY
}

if answers; then
    log "Orthanc DICOMweb already answers at $URL"
    exit 0
fi

ORTHANC=$(command -v Orthanc || echo /usr/sbin/Orthanc)
[ -x "$ORTHANC" ] || die "Orthanc not installed (apt-get install orthanc orthanc-dicomweb)"
PLUGIN=$(ls /usr/lib/orthanc/libOrthancDicomWeb.so* /usr/share/orthanc/plugins/libOrthancDicomWeb.so* 2>/dev/null | head -n 1 || true)
[ -n "$PLUGIN" ] || die "the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"

DIR=${ORTHANC_DIR:-$(mktemp -d /tmp/glandpet-orthanc.XXXXXX)}
mkdir -p "$DIR/db"
cat > "$DIR/orthanc.json" <<JSON
{
  "Name": "glandpet-test-orthanc",
  "StorageDirectory": "$DIR/db",
  "IndexDirectory": "$DIR/db",
  "HttpServerEnabled": true,
  "HttpPort": $PORT,
  "HttpBindAddresses": ["127.0.0.1"],
  "RemoteAccessAllowed": false,
  "AuthenticationEnabled": false,
  "DicomServerEnabled": false,
  "Plugins": ["$PLUGIN"],
  "DicomWeb": {"Enable": true, "Root": "/dicom-web/", "EnableWado": false}
}
JSON
log "$("$ORTHANC" --version | head -n 1), plugin $(basename "$PLUGIN"), config $DIR/orthanc.json"
nohup "$ORTHANC" "$DIR/orthanc.json" >"$DIR/orthanc.log" 2>&1 &
echo $! >"$DIR/orthanc.pid"

for _ in $(seq 1 60); do
    if answers; then
        log "Orthanc (pid $(cat "$DIR/orthanc.pid")) answers at $URL"
        exit 0
    fi
    kill -0 "$(cat "$DIR/orthanc.pid")" 2>/dev/null || { tail -n 20 "$DIR/orthanc.log" >&2; die "Orthanc exited"; }
    sleep 0.5
done
tail -n 20 "$DIR/orthanc.log" >&2
die "Orthanc did not answer at $URL within 30 s"
