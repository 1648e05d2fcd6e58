# Builder of nixery-python-deps (see nixery.nix): the pip-installed
# dependencies, made to run from the store with the Debian set's python3.
#   1. copy the `pip install --target` tree to $out/lib/python
#   2. ELF files: wheels are built for "manylinux" systems, whose libraries are
#      found in /lib and /usr/lib, which an image does not have. Every library
#      an ELF file needs that is neither next to it (its $ORIGIN RPATH, where
#      auditwheel puts the libraries it bundles) nor glibc's loader is looked
#      up in $libraryDirs (glibc, libstdc++, zlib of the Debian set) and that
#      directory is added to the file's RPATH. A library found nowhere, an ELF
#      interpreter, or a glibc symbol version newer than the set's glibc fails
#      the build.
#   3. precompile (unchecked-hash .pyc files: valid whatever the files' mtime)
out=${out:?}
site=$out/lib/python
mkdir -p "$out/lib" "$out/nix-support"
cp -r "$tree" "$site"
chmod -R u+w "$out"
rm -rf "$site/bin"  # console scripts of pip's interpreter: not ours

glibc=$("$python" -c 'import os; print(os.confstr("CS_GNU_LIBC_VERSION").split()[1])')
newest_allowed=${glibc#2.}
IFS=: read -r -a dirs <<< "$libraryDirs"
problems=0
patched=0
elf=$(printf '\177ELF')
while IFS= read -r -d '' f; do
  [ "$(head -c 4 "$f")" = "$elf" ] || continue
  rel=${f#"$site"/}
  if interp=$($patchelf --print-interpreter "$f" 2>/dev/null) && [ -n "$interp" ]; then
    echo "nixery-python-deps: $rel has an ELF interpreter ($interp): programs are not supported" >&2
    problems=$((problems + 1))
    continue
  fi
  newest=$(grep -ao 'GLIBC_2\.[0-9]*' "$f" | sed 's/GLIBC_2\.//' | sort -n | tail -n 1 || true)
  if [ -n "$newest" ] && [ "$newest" -gt "$newest_allowed" ]; then
    echo "nixery-python-deps: $rel needs glibc 2.$newest, the set has $glibc" >&2
    problems=$((problems + 1))
  fi
  old=$($patchelf --print-rpath "$f")
  own=()
  IFS=: read -r -a entries <<< "$old"
  for d in "${entries[@]}"; do
    case $d in
      '$ORIGIN'*) own+=("$(dirname "$f")${d#'$ORIGIN'}") ;;
      /nix/store/*) own+=("$d") ;;
    esac
  done
  add=()
  for lib in $($patchelf --print-needed "$f"); do
    case $lib in ld-linux-x86-64.so.2) continue ;; esac  # the loader itself, always loaded
    found=""
    for d in "${own[@]}"; do
      if [ -e "$d/$lib" ]; then found=own; break; fi
    done
    [ -z "$found" ] || continue
    for d in "${dirs[@]}"; do
      if [ -e "$d/$lib" ]; then
        found=$d
        case " ${add[*]} " in *" $d "*) ;; *) add+=("$d") ;; esac
        break
      fi
    done
    if [ -z "$found" ]; then
      echo "nixery-python-deps: $rel needs $lib, which is in none of $libraryDirs" >&2
      problems=$((problems + 1))
    fi
  done
  if [ ${#add[@]} -gt 0 ]; then
    new=$old
    for d in "${add[@]}"; do new=${new:+$new:}$d; done
    $patchelf --force-rpath --set-rpath "$new" "$f"
    echo "$rel $new" >> "$out/nix-support/patched-rpaths"
    patched=$((patched + 1))
  fi
done < <(find "$site" -type f \( -name '*.so' -o -name '*.so.*' \) -print0 | sort -z)
if [ $problems -gt 0 ]; then
  echo "nixery-python-deps: $problems problem(s) with the wheels' ELF files (see above)" >&2
  exit 1
fi
echo "nixery-python-deps: pointed $patched ELF files at the Debian set's libraries (glibc $glibc)"

# A few files of some packages are not Python 3.11 (templates, tests): not fatal.
"$python" -m compileall -q -j 0 --invalidation-mode unchecked-hash "$site" > "$out/nix-support/compileall.log" 2>&1 ||
  echo "nixery-python-deps: some files were not compiled (nix-support/compileall.log)"
