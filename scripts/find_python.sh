#!/usr/bin/env bash
# Prints the path of a Python >= 3.12 interpreter, or fails with a clear message.
# Order: $PYTHON, python3.12/3.13/python3 on PATH, then pyenv's installed versions.
set -u
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }
for cand in ${PYTHON:-} python3.12 python3.13 python3.14 python3; do
  if command -v "$cand" >/dev/null 2>&1 && ok "$cand"; then
    command -v "$cand"; exit 0
  fi
done
if command -v pyenv >/dev/null 2>&1; then
  for dir in $(ls -d "$(pyenv root)"/versions/3.1[2-9]* 2>/dev/null | sort -V); do
    if [ -x "$dir/bin/python3" ] && ok "$dir/bin/python3"; then
      echo "$dir/bin/python3"; exit 0
    fi
  done
fi
echo "error: jaxsun needs Python >= 3.12 (jax >= 0.11 does not support older Pythons)," >&2
echo "       and none was found on PATH or in pyenv. Install one, or set PYTHON=/path/to/python3.12." >&2
exit 1
