# Builder of one derivation of the Debian-derived set (busybox sh; see lib.nix
# mkDeb for the variables). Steps:
#   1. unpack the .deb files into $out
#   2. the links Debian's postinst would have made (update-alternatives), fixups
#   3. symlinks: absolute ones into $out become relative, ones into a dependency
#      point at its store path, the rest (host-only targets) are removed
#   4. ELF files: interpreter -> the store's ld-linux-x86-64.so.2, RPATH -> the
#      directories (of $out and its dependency closure) of the libraries they need
#   5. "#!" lines -> store paths (overrides, then $out, then the closure);
#      "#!/usr/bin/env" is left alone (the registry links /usr/bin/env)
#   6. wrappers that set data paths for programs that look them up under /
#   7. $out/bin and $out/sbin link to usr/bin and usr/sbin (the registry links
#      /bin/<program> to every file in a package's bin/ and sbin/)
#   8. nix-support/debian-depends names the dependencies, so the closure of the
#      derivation is the closure of the Debian package even where no file
#      mentions a dependency; debian-packages names the packages, debian-versions
#      (step 1) their versions and architectures (for the SBOM's package URLs)
set -eu
. "$common"

tmp=${TMPDIR:-/tmp}/build-deb-$$
mkdir -p "$out/nix-support" "$tmp"

# untar ARCHIVE DIR [MEMBER...]: extract a .deb's tar member (xz, gzip, bzip2 or none) into DIR.
untar() {
  archive=$1 dir=$2
  shift 2
  case $archive in
    *.xz) xz -dc "$archive" | tar -x -C "$dir" "$@" ;;
    *.gz) gzip -dc "$archive" | tar -x -C "$dir" "$@" ;;
    *.bz2) bzip2 -dc "$archive" | tar -x -C "$dir" "$@" ;;
    *.tar) tar -xf "$archive" -C "$dir" "$@" ;;
    *) log "$deb: $archive is not supported by busybox tar"; exit 1 ;;
  esac
}

# field NAME: the value of a field of the control file in this directory.
field() { sed -n "s/^$1: *//p" control; }

# 1. unpack; each package's name, version (with its epoch) and architecture (its own or `all`),
#    as its control file says them, are a line of nix-support/debian-versions
for deb in $debs; do
  rm -rf "$tmp/ar" && mkdir "$tmp/ar" && cd "$tmp/ar"
  ar x "$deb"
  untar "$(ls data.tar*)" "$out"
  untar "$(ls control.tar*)" . ./control
  echo "$(field Package) $(field Version) $(field Architecture)" >> "$out/nix-support/debian-versions"
done
cd "$out"
rm -rf "$tmp/ar"
chmod -R u+w "$out"

# 2. alternatives and package-specific fixups
echo "$alternatives" | while read -r link target; do
  [ -n "$link" ] || continue
  mkdir -p "$out/${link%/*}"
  ln -sfn "$target" "$out/$link"
  [ -e "$out/$link" ] || { log "alternative $link -> $target points nowhere"; exit 1; }
done
if [ -n "$fixup" ]; then
  eval "$fixup"
fi
cd "$out"

# 3. symlinks
find "$out" -type l > "$tmp/links"
while read -r link; do
  target=$(readlink "$link")
  case $target in /nix/store/*) continue ;; esac
  rel=${link#$out/}
  case $rel in */*) dir=${rel%/*} ;; *) dir="" ;; esac
  case $target in
    /*) abs=$(normalize "$target") ;;
    *) abs=$(normalize "$dir/$target") ;;
  esac
  if [ -e "$out$abs" ] || [ -L "$out$abs" ]; then
    case $target in
      /* | *..*) ln -sfn "$(relative "$dir" "$abs")" "$link" ;;
    esac
    continue
  fi
  found=""
  for dep in $closure; do
    if [ -e "$dep$abs" ]; then found=$dep$abs; break; fi
  done
  if [ -n "$found" ]; then
    ln -sfn "$found" "$link"
  else
    log "removing /$rel -> $target (not in this package or its dependencies)"
    echo "/$rel -> $target" >> "$out/nix-support/removed-links"
    rm "$link"
  fi
done < "$tmp/links"

# 4. ELF files
[ -n "$interpreter" ] || interpreter=$out/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
[ -e "$interpreter" ] || interpreter=""
searchdirs=""
for p in "$out" $closure; do
  for d in lib/x86_64-linux-gnu usr/lib/x86_64-linux-gnu lib usr/lib lib64; do
    if [ -d "$p/$d" ] && [ ! -L "$p/$d" ]; then searchdirs="$searchdirs $p/$d"; fi
  done
done
elf=$(printf '\177ELF')
find "$out" -type f \( -perm -100 -o -name '*.so' -o -name '*.so.*' \) | sort > "$tmp/candidates"
patched=0
while read -r f; do
  [ "$(head -c 4 "$f")" = "$elf" ] || continue
  case ${f#$out/} in
    # glibc's loader is never touched; libc (which is also a program: it
    # prints its version) only gets the store's loader as its interpreter
    lib/x86_64-linux-gnu/ld-linux-x86-64.so.2) continue ;;
    lib/x86_64-linux-gnu/libc.so.6)
      if [ -n "$interpreter" ] && $patchelf --print-interpreter "$f" >/dev/null 2>&1; then
        $patchelf --set-interpreter "$interpreter" "$f"
      fi
      continue ;;
  esac
  needed=$($patchelf --print-needed "$f" 2>/dev/null) || continue  # not dynamic
  interp=$($patchelf --print-interpreter "$f" 2>/dev/null) || interp=""
  old=$($patchelf --print-rpath "$f" 2>/dev/null) || old=""
  fdir=${f%/*}
  extra=""
  for d in $(echo "$old" | tr ':' ' '); do
    case $d in
      '$ORIGIN'*) extra="$extra $fdir${d#'$ORIGIN'}" ;;
      /nix/store/*) extra="$extra $d" ;;
      /*) extra="$extra $out$d" ;;
    esac
  done
  dirs=""
  for lib in $needed; do
    found=""
    for d in $fdir $extra $searchdirs; do
      if [ -e "$d/$lib" ]; then found=$d; break; fi
    done
    if [ -z "$found" ]; then
      log "${f#$out/}: needs $lib, which is in none of its dependencies"
      echo "${f#$out/} $lib" >> "$out/nix-support/missing-libraries"
      continue
    fi
    case " $dirs " in *" $found "*) ;; *) dirs="$dirs $found" ;; esac
  done
  rpath=$(echo $dirs | tr ' ' ':')
  set --
  if [ -n "$interp" ]; then
    if [ -z "$interpreter" ]; then
      log "${f#$out/}: has interpreter $interp but glibc is not among the dependencies"
      echo "${f#$out/} $interp" >> "$out/nix-support/missing-libraries"
    else
      set -- --set-interpreter "$interpreter"
    fi
  fi
  if [ -n "$rpath" ]; then
    set -- "$@" --force-rpath --set-rpath "$rpath"
  elif [ -n "$old" ]; then
    set -- "$@" --remove-rpath
  fi
  if [ $# -gt 0 ]; then
    $patchelf "$@" "$f"
    patched=$((patched + 1))
  fi
done < "$tmp/candidates"
log "patched $patched ELF files"

# 5. "#!" lines
resolve_interpreter() {
  local path target
  while read -r path target; do
    if [ "$path" = "$1" ]; then echo "$target"; return 0; fi
  done <<EOF
$interpreters
EOF
  if [ -e "$out$1" ] && [ ! -d "$out$1" ]; then echo "$out$1"; return 0; fi
  for dep in $closure; do
    if [ -e "$dep$1" ] && [ ! -d "$dep$1" ]; then echo "$dep$1"; return 0; fi
  done
  return 1
}
find "$out" -type f -perm -100 | sort > "$tmp/executables"
while read -r f; do
  [ "$(head -c 2 "$f")" = "#!" ] || continue
  read -r first < "$f" || true
  spec=${first#??}
  spec=${spec#"${spec%%[! ]*}"}
  interp=${spec%% *}
  case $interp in /nix/store/* | /usr/bin/env | "") continue ;; esac
  if new=$(resolve_interpreter "$interp"); then
    sed -i "1s|^#![ ]*$interp|#!$new|" "$f"
  else
    log "${f#$out/}: interpreter $interp is in none of its dependencies"
    echo "${f#$out/} $interp" >> "$out/nix-support/missing-interpreters"
  fi
done < "$tmp/executables"

# 6. wrappers
if [ -n "$wrappers" ]; then
  write_wrappers "$wrappers" "$wrapperShell"
fi

# 7. bin/ and sbin/
for pair in usr/bin:bin usr/sbin:sbin; do
  from=${pair%:*} to=${pair#*:}
  [ -d "$out/$from" ] || continue
  mkdir -p "$out/$to"
  for entry in "$out/$from"/*; do
    [ -e "$entry" ] || [ -L "$entry" ] || continue
    name=${entry##*/}
    [ -e "$out/$to/$name" ] || [ -L "$out/$to/$name" ] || ln -s "../$from/$name" "$out/$to/$name"
  done
done

# Links left dangling by the removals above.
while :; do
  removed=0
  find "$out" -type l > "$tmp/links"
  while read -r link; do
    if [ ! -e "$link" ]; then
      log "removing dangling ${link#$out/} -> $(readlink "$link")"
      echo "/${link#$out/} -> $(readlink "$link")" >> "$out/nix-support/removed-links"
      rm "$link"
      removed=1
    fi
  done < "$tmp/links"
  [ $removed = 1 ] || break
done

# 8. references
for dep in $deps; do echo "$dep"; done > "$out/nix-support/debian-depends"
echo "$debianPackages" > "$out/nix-support/debian-packages"
rm -rf "$tmp"
