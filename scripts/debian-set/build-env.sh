# Builder of merged trees (see lib.nix mkEnv): every file of every member
# becomes a symlink at the same place in $out, the first member providing a
# path wins. Relative symlinks of members are copied as they are (they then
# resolve in the merged tree); absolute ones into a member are pointed at the
# same path in $out. `copy` files are copied instead (python3 locates its
# standard library from its own real location). Programs in bin/ whose "#!"
# names a member's interpreter are copied and pointed at the merged one.
set -eu
. "$common"

mkdir -p "$out/nix-support"
tmp=${TMPDIR:-/tmp}/build-env-$$
mkdir -p "$tmp"

# Where a member's absolute symlink lands in the merged tree.
retarget() {
  local m
  for m in $paths; do
    case $1 in "$m"/*) echo "$out/${1#$m/}"; return ;; esac
  done
  echo "$1"
}

for p in $paths; do
  if [ -n "$binOnly" ]; then
    # Only programs, each linked to the member's own entry.
    for d in bin sbin; do
      [ -d "$p/$d" ] || continue
      mkdir -p "$out/$d"
      for entry in "$p/$d"/*; do
        name=${entry##*/}
        [ -e "$out/$d/$name" ] || [ -L "$out/$d/$name" ] || ln -s "$entry" "$out/$d/$name"
      done
    done
    continue
  fi
  (cd "$p" && find . -mindepth 1 ! -path ./nix-support ! -path './nix-support/*') > "$tmp/entries"
  while read -r rel; do
    rel=${rel#./}
    src=$p/$rel dst=$out/$rel
    if [ -L "$src" ]; then
      [ -e "$dst" ] || [ -L "$dst" ] && continue
      target=$(readlink "$src")
      case $target in
        /*) ln -s "$(retarget "$target")" "$dst" ;;
        *) ln -s "$target" "$dst" ;;
      esac
    elif [ -d "$src" ]; then
      [ -L "$dst" ] && continue  # an earlier member has a link there
      mkdir -p "$dst"
    else
      [ -e "$dst" ] || [ -L "$dst" ] || ln -s "$src" "$dst"
    fi
  done < "$tmp/entries"
done

for file in $copy; do
  real=$(readlink -f "$out/$file")
  rm "$out/$file"
  cp "$real" "$out/$file"
  chmod 555 "$out/$file"
done

# Scripts of the members whose interpreter is a member's: use the merged one.
for d in bin sbin usr/bin usr/sbin; do
  [ -d "$out/$d" ] && [ -z "$binOnly" ] || continue
  for entry in "$out/$d"/*; do
    [ -L "$entry" ] || continue
    real=$(readlink -f "$entry") || continue
    [ -f "$real" ] && [ "$(head -c 2 "$real")" = "#!" ] || continue
    read -r first < "$real" || true
    spec=${first#??}
    spec=${spec#"${spec%%[! ]*}"}
    interp=${spec%% *}
    merged=$(retarget "$interp")
    [ "$merged" != "$interp" ] || continue
    case $(readlink "$entry") in /*) ;; *) continue ;; esac  # relative: copied through its target
    rm "$entry"
    sed "1s|^#![ ]*$interp|#!$merged|" "$real" > "$entry"
    chmod 555 "$entry"
  done
done

if [ -n "$wrappers" ]; then
  write_wrappers "$wrappers" "$wrapperShell"
fi

for dep in $paths $extraDeps; do echo "$dep"; done > "$out/nix-support/env-depends"
rm -rf "$tmp"
