# Shell functions shared by build-deb.sh and build-env.sh (busybox ash).

log() { echo "debian-set: $*" >&2; }

# "usr/lib/../bin/./x" -> "/usr/bin/x": a path inside a Debian file system,
# normalized as the kernel would at its root ("/.." is "/").
normalize() {
  set -f
  local IFS=/ r="" p
  for p in $1; do
    case $p in
      '' | .) ;;
      ..) case $r in */*) r=${r%/*} ;; *) r="" ;; esac ;;
      *) r=${r:+$r/}$p ;;
    esac
  done
  set +f
  echo "/$r"
}

# relative DIR ABS: the relative link target, from directory DIR (relative to
# the package root), of the package path ABS ("/usr/bin/x").
relative() {
  local up
  up=$(echo "$1" | sed 's|[^/][^/]*|..|g')
  echo "${up:+$up/}${2#/}"
}

# write_wrappers SPEC SHELL: SPEC has one line per wrapped file:
#   "path<TAB>VAR=value<TAB>VAR+=value..." ("@out@" stands for $out).
# The file moves to $out/libexec/nixery-wrapped/PATH and PATH becomes a bash
# script that sets the variables (VAR=value: when unset; VAR+=value: appended
# to the caller's value) and execs it with the same argv[0].
write_wrappers() {
  local spec=$1 shell=$2 file rest src dst assignment var value tab
  tab=$(printf '\t')
  shell=$(echo "$shell" | sed "s|@out@|$out|g")
  echo "$spec" | while IFS="$tab" read -r file rest; do
    [ -n "$file" ] || continue
    src=$out/$file
    dst=$out/libexec/nixery-wrapped/$file
    mkdir -p "${dst%/*}"
    if [ -L "$src" ] && [ -f "$src" ]; then
      # a link (merged trees): the wrapped program is its target
      ln -s "$(readlink -f "$src")" "$dst"
      rm "$src"
    elif [ -f "$src" ]; then
      mv "$src" "$dst"
    else
      log "cannot wrap $file: not a file"
      exit 1
    fi
    {
      echo "#!$shell"
      echo "# nixery debian-set wrapper: sets the paths that $file would look up under / and execs it"
      IFS="$tab"
      for assignment in $rest; do
        var=${assignment%%=*}
        value=$(echo "${assignment#*=}" | sed "s|@out@|$out|g")
        case $var in
          *+) var=${var%+}; echo "export $var=\"\${$var:+\$$var:}$value\"" ;;
          *) echo "export $var=\"\${$var-$value}\"" ;;
        esac
      done
      echo "exec -a \"\$0\" \"$dst\" \"\$@\""
    } > "$src"
    chmod 555 "$src"
  done
}
