#!/usr/bin/env bash
# The system packages make test needs beside Python, installed from Debian's packages when missing, with the time
# printed: Chromium and its driver (the team stack's browser test), Node.js and npm (its S3 endpoint, s3rver),
# Orthanc with its DICOMweb and web viewer plugins (the local PACS), and the DICOM validators the write-back's tests
# run on every object written: dciodvfy (dicom3tools) and dsrdump (dcmtk).
# Needs root or sudo; without either it says which packages to install and fails.
set -euo pipefail
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
# The local PACS (make pacs, the DICOMweb tests): Orthanc and its DICOMweb plugin.
command -v Orthanc >/dev/null || [ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
[ -f /usr/share/orthanc/plugins/libOrthancWebViewer.so ] || missing+=(orthanc-webviewer)
# Validators no one here wrote (the write-back's tests): the IOD checker and the SR reader.
command -v dciodvfy >/dev/null || missing+=(dicom3tools)
command -v dsrdump >/dev/null || missing+=(dcmtk)
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null; then
    echo "make test needs these Debian packages: ${missing[*]} (apt-get install ${missing[*]} as root)" >&2
    exit 1
  fi
  sudo="sudo"
fi
start=$(date +%s)
echo "installing ${missing[*]} from Debian's packages (make test needs them)"
$sudo apt-get update -q >/dev/null
# Debian's orthanc package starts a system service on port 8042 when it can; the project runs its own Orthanc
# (make pacs), so services are not started during this install (policy-rc.d, removed afterwards).
guard=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null && $sudo chmod +x /usr/sbin/policy-rc.d
  guard=/usr/sbin/policy-rc.d
fi
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
[ -n "$guard" ] && $sudo rm -f "$guard"
echo "installed ${missing[*]} from Debian's packages in $(( $(date +%s) - start )) s"
