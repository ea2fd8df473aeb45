"""Turn a parsed `POST /tasks` form into a validated training configuration and a data folder.

Everything a client can get wrong is checked here, before a task row exists, and reported as a 4xx
naming the field: class names, labels, images, archive layout, method and hyper-parameters.
"""

from __future__ import annotations

import re
import unicodedata
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from upt.auto import AUTO, CANDIDATES, AutoConfig, base_config, parse_candidates
from upt.data import CLASSNAMES_FILE, read_classnames
from upt.errors import ConfigError, DataError, UptError
from upt.methods import METHODS
from upt.architecture import Architecture, architecture
from upt.methods.model import check_start_token, check_text_prompt_fits
from upt.methods.registry import train_options
from upt.training import TrainConfig

from service.errors import invalid
from service.settings import Settings
from service.storage import Storage
from service.uploads import (MAX_FIELD_BYTES, ImageLimits, ParsedForm, UploadedFile, check_request_pixels, decode_upload,
                             too_large)

MAX_CLASS_NAME_BYTES = 200
CHUNK_BYTES = 1024 * 1024
# What reading a zip member raises on a damaged or hostile archive: a bad CRC or header, an unsupported
# compression method or encryption, a truncated or corrupt stream.
EXTRACT_ERRORS = (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError, EOFError, zlib.error)


@dataclass
class TaskSpec:
    class_names: list[str]
    config: TrainConfig | AutoConfig
    images: list[tuple[str, str, UploadedFile]]  # (class name, source name, upload)


def parse_config(form: ParsedForm, settings: Settings) -> TrainConfig | AutoConfig:
    """The method and its options (the registry's, each parsed and checked by its spec); a 422 names
    the field at fault, as the ConfigError raised for it does."""
    method = form.one("method")
    choices = ", ".join((*METHODS, AUTO))
    if method is None:
        raise invalid("method", f"choose one of {choices}.")
    if method not in (*METHODS, AUTO):
        raise invalid("method", f"unknown method {method!r}; choose one of {choices}.")
    if form.one(CANDIDATES.name) is not None and method != AUTO:
        raise invalid(CANDIDATES.name, "applies to method=auto only.")
    try:
        candidates = parse_candidates(form.one(CANDIDATES.name)) if method == AUTO else None
    except ConfigError as error:
        raise invalid(CANDIDATES.name, str(error))
    try:
        options = {option.name: option.parse(raw) for option in train_options()
                   if (raw := form.one(option.name)) is not None}
        # An option the method does not use is refused here, by the core's rule (TrainConfig.of,
        # base_config for auto): a 422 naming it, before the epochs' cap can speak about it.
        config = AutoConfig(base_config(candidates, **options), candidates) if candidates \
            else TrainConfig.of(method, **options)
        if config.epochs is not None and config.epochs > settings.max_epochs:
            raise ConfigError(f"at most {settings.max_epochs} (UPT_MAX_EPOCHS).", field="epochs")
        return config.validate()  # auto: every candidate's options checked now, not when the worker reaches it
    except ConfigError as error:
        raise invalid(error.field or "config", str(error))


TASK_FIELDS = frozenset({"class_names", "files", "labels", "archive", "method"})
# Characters that change how a name reads, or make two names that read alike differ: C0 and C1 controls,
# and the bidirectional overrides, embeddings, isolates and marks (U+202E shows "gab" for "bag").
_CONTROL_OR_BIDI = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def check_known_fields(form: ParsedForm, known: set[str] | frozenset[str]) -> None:
    """A 422 naming the first form field the route does not take: `epoch=1` for `epochs=1`, ignored,
    trained with the default."""
    unknown = sorted((set(form.fields) | {f.field for f in form.files}) - set(known))
    if unknown:
        raise invalid(unknown[0], f"this form has no field {unknown[0]!r}; its fields are {', '.join(sorted(known))}.")


def task_fields() -> frozenset[str]:
    """The fields POST /tasks takes: the task's own and every training option of the registry."""
    return TASK_FIELDS | {CANDIDATES.name} | {option.name for option in train_options()}


def _visible(name: str) -> str:
    """The name as it reads: without format characters (zero-width spaces and joiners, soft hyphens)."""
    return "".join(c for c in name if unicodedata.category(c) != "Cf")


def normal_name(name: str) -> str:
    """A class name or label as compared and stored: NFC (`cát` typed or from a macOS zip's NFD folder
    name is one class), without surrounding spaces."""
    return unicodedata.normalize("NFC", name).strip()


def check_class_names(names: list[str], settings: Settings) -> list[str]:
    """The names NFC-normalised, or a 422: a task's and zero-shot's alike (a task's images are stored by
    class index, so '/' or a leading '.' are fine)."""
    if len(names) > settings.max_classes:  # before any name is looked at: 120 x 60,000 characters cost seconds
        raise invalid("class_names", f"at most {settings.max_classes} classes (UPT_MAX_CLASSES).")
    names = [normal_name(n) for n in names]
    if any(not n for n in names):
        raise invalid("class_names", "a class name is empty.")
    for name in names:
        # Control and bidirectional characters and very long names cannot be used: names are shown in
        # lists, reports and prompts, and encoded by the text encoder on every zero-shot request.
        if (_CONTROL_OR_BIDI.search(name) or not _visible(name).strip() or len(name) > 200
                or len(name.encode("utf-8", "surrogatepass")) > MAX_CLASS_NAME_BYTES):
            raise invalid("class_names", f"{name[:60]!r} cannot be used: no control or bidirectional characters, "
                          f"at most 200 characters and {MAX_CLASS_NAME_BYTES} bytes in UTF-8.")
    seen: dict[str, str] = {}
    for name in names:
        # Compared as they read: `bag` and `bag` with a zero-width space are one name given twice.
        key = _visible(name).casefold()
        if key in seen:
            raise invalid("class_names", f"{name!r} is given twice (class names are compared ignoring case and "
                          "invisible characters).")
        seen[key] = name
    if len(names) < 2:
        raise invalid("class_names", "give at least two classes.")
    return names


def _labelled_files(form: ParsedForm, class_names: list[str]) -> list[tuple[str, str, UploadedFile]]:
    files, labels = form.files_of("files"), [normal_name(label) for label in form.many("labels")]
    if len(labels) != len(files):
        raise invalid("labels", f"give one label per file, in the same order: {len(files)} files, "
                      f"{len(labels)} labels.")
    known = set(class_names)
    for index, label in enumerate(labels):
        if label not in known:
            raise invalid("labels", f"label {label!r} of file {index + 1} ({files[index].filename}) names "
                          f"no class; classes are {', '.join(class_names)}.")
    return [(label, f.filename, f) for label, f in zip(labels, files)]


def _read_archive_classnames(archive: zipfile.ZipFile, info: zipfile.ZipInfo, upload: UploadedFile,
                             settings: Settings) -> dict[str, str]:
    """An archive's `classnames.txt`, read by the CLI's own reader (upt.data.read_classnames)."""
    if info.file_size > MAX_FIELD_BYTES * 16:
        raise too_large(f"{info.filename} is larger than {MAX_FIELD_BYTES * 16} bytes.")
    target = upload.path.with_name(f"{upload.path.stem}-{CLASSNAMES_FILE}")
    try:
        with archive.open(info) as member:
            target.write_bytes(member.read(MAX_FIELD_BYTES * 16 + 1)[:MAX_FIELD_BYTES * 16])
        return read_classnames(target)
    except DataError as error:
        raise invalid("archive", str(error).replace(str(target), info.filename))
    except EXTRACT_ERRORS as error:
        raise invalid("archive", f"{info.filename} cannot be extracted ({error}).")


def _archive_members(upload: UploadedFile, settings: Settings,
                     display: dict[str, str]) -> Iterator[tuple[str, str, UploadedFile]]:
    """(folder, member name, extracted file) per image of a zip of class folders, with bounded reads.

    Members are extracted to files beside the upload (its scratch folder), not kept in memory: an
    archive may unpack to UPT_MAX_UPLOAD_BYTES, and write_dataset decodes them one at a time. A
    `classnames.txt` beside the class folders fills `display` (folder -> class name)."""
    entries = _zip_entry_count(upload)
    # Every entry counts, hidden ones and folders too, read from the central directory's end record
    # before zipfile parses the directory itself (300,000 entries took seconds of CPU to list).
    if entries > settings.max_files:
        raise too_large(f"The archive holds {entries} entries; at most {settings.max_files} (UPT_MAX_FILES).")
    try:
        archive = zipfile.ZipFile(upload.path)
    except (zipfile.BadZipFile, OSError):
        raise invalid("archive", f"{upload.filename} is not a zip file.")
    with archive:
        if len(archive.infolist()) > settings.max_files:  # an end record that lied about the count
            raise too_large(f"The archive holds more than {settings.max_files} entries (UPT_MAX_FILES).")
        infos = [i for i in archive.infolist() if not i.is_dir() and not _hidden(i.filename)]
        names_files = [i for i in infos if PurePosixPath(i.filename).name == CLASSNAMES_FILE
                       and len(PurePosixPath(i.filename).parts) <= 2]
        infos = [i for i in infos if i not in names_files]
        if sum(i.file_size for i in infos) > settings.max_upload_bytes:
            raise too_large(f"The archive unpacks to more than {settings.max_upload_bytes} bytes.")
        paths = [PurePosixPath(i.filename).parts for i in infos]
        # Accept "class/img.png" and a single wrapping folder "root/class/img.png".
        strip = 1 if paths and all(len(p) == 3 for p in paths) and len({p[0] for p in paths}) == 1 else 0
        for info in names_files:  # beside the class folders: "<folder> <class name>" a line, as the CLI reads it
            if len(PurePosixPath(info.filename).parts) == strip + 1:
                display.update(_read_archive_classnames(archive, info, upload, settings))
        unpacked = 0
        for index, (info, parts) in enumerate(zip(infos, paths)):
            parts = parts[strip:]
            if len(parts) != 2:
                raise invalid("archive", f"{info.filename} is not inside a class folder; lay the zip out as "
                              "<class name>/<image>.")
            if info.file_size > settings.max_file_bytes:
                raise too_large(f"{info.filename} is larger than {settings.max_file_bytes} bytes.")
            target = upload.path.with_name(f"{upload.path.stem}-{index:06d}.member")
            extracted = UploadedFile("archive", info.filename, target)
            try:
                with archive.open(info) as member, open(extracted.path, "wb") as out:
                    while chunk := member.read(CHUNK_BYTES):
                        extracted.size += len(chunk)
                        unpacked += len(chunk)
                        if extracted.size > settings.max_file_bytes:  # sizes in the header can lie
                            raise too_large(f"{info.filename} is larger than {settings.max_file_bytes} bytes.")
                        if unpacked > settings.max_upload_bytes:  # and so can their sum
                            raise too_large(f"The archive unpacks to more than {settings.max_upload_bytes} bytes.")
                        out.write(chunk)
            except EXTRACT_ERRORS as error:
                raise invalid("archive", f"{info.filename} cannot be extracted ({error}).")
            yield parts[0], info.filename, extracted


def _zip_entry_count(upload: UploadedFile) -> int:
    """The number of entries the zip's end-of-central-directory record declares (zip64 included)."""
    try:
        with open(upload.path, "rb") as handle:
            end = zipfile._EndRecData(handle)  # the stdlib's own reader of that record
    except OSError:
        end = None
    if not end:
        raise invalid("archive", f"{upload.filename} is not a zip file.")
    return int(end[zipfile._ECD_ENTRIES_TOTAL])


def _hidden(name: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in PurePosixPath(name).parts)


def parse_task_form(form: ParsedForm, settings: Settings) -> TaskSpec:
    check_known_fields(form, task_fields())
    config = parse_config(form, settings)
    archives, files = form.files_of("archive"), form.files_of("files")
    if archives and files:
        raise invalid("archive", "send either `files` with `labels` or one `archive`, not both.")
    if len(archives) > 1:
        raise invalid("archive", "send one archive.")
    given = form.many("class_names")
    if archives:
        display: dict[str, str] = {}
        members = list(_archive_members(archives[0], settings, display))
        folders = sorted({folder for folder, _, _ in members})  # two spellings of one name are refused below
        unnamed = [folder for folder in folders if display and folder not in display]
        if unnamed:
            raise invalid("archive", f"{CLASSNAMES_FILE} names no class for folder(s) {', '.join(unnamed[:5])}.")
        class_of = {folder: display.get(folder, folder) for folder in folders}
        class_names = check_class_names(given or [class_of[folder] for folder in folders], settings)
        # A folder stands for its class: by the name classnames.txt gives it, or by its own name.
        known = {normal_name(name): name for name in class_names}
        label_of = {}
        for folder, name, _ in members:
            label = known.get(normal_name(class_of[folder])) or known.get(normal_name(folder))
            if label is None:
                raise invalid("archive", f"folder {folder!r} ({name}) names no class; classes are "
                              f"{', '.join(class_names)}.")
            label_of[folder] = label
        images = [(label_of[folder], name, data) for folder, name, data in members]
    else:
        if not files:
            raise invalid("files", "upload images as `files` (with `labels`) or one zip as `archive`.")
        if not given:
            raise invalid("class_names", "give the class names (one `class_names` field per class).")
        class_names = check_class_names(given, settings)
        images = _labelled_files(form, class_names)
    counts = {name: 0 for name in class_names}
    for label, _, _ in images:
        counts[label] += 1
    empty = [name for name, count in counts.items() if count == 0]
    if empty:
        raise invalid("files", f"class {empty[0]!r} has no images; every class needs at least one.")
    config.class_names = class_names  # the client's order, which predictions and metrics follow
    return TaskSpec(class_names, config, images)


def parse_checked_task_form(form: ParsedForm, settings: Settings) -> TaskSpec:
    """`parse_task_form`, with the options checked against the configured model's architecture, and the
    images' pixels from their headers, before anything is decoded or the backbone is waited for."""
    spec = parse_task_form(form, settings)
    check_request_pixels([(upload.path, name, upload.field) for _, name, upload in spec.images],
                         ImageLimits.of(settings))
    try:
        model = architecture(settings.model)
    except UptError:  # no such model: the backbone's load fails too, and its 503 says how to configure one
        return spec
    check_against_architecture(spec.config, model)
    return spec


def check_against_architecture(config: TrainConfig | AutoConfig, model: Architecture) -> None:
    """Options only the backbone's architecture can judge (a prompt depth beyond its layers, a text
    context that leaves no room for the class names): a 422 now, rather than a task that is queued and
    then fails in the worker. The architecture is open_clip's config: no weights are needed."""
    for one in config.configs() if isinstance(config, AutoConfig) else [config]:  # auto: each candidate
        spec = one.spec
        try:
            if spec.depth is not None:
                spec.depth.resolve(one.prompt.depth, model)
            if spec.learns_text:
                check_start_token(model)
                if one.class_names:
                    check_text_prompt_fits(model, one.prompt, one.class_names)
        except ConfigError as error:
            raise invalid(error.field or "config", str(error))


def write_dataset(spec: TaskSpec, data_dir: Path, settings: Settings) -> None:
    """Decode every image (4xx on the first bad one) and store it as PNG in ImageFolder layout; the
    request's pixels were checked by `parse_checked_task_form`."""
    limits = ImageLimits.of(settings)
    counters: dict[str, int] = {}
    folder_of = dict(zip(spec.class_names, Storage.class_folders(len(spec.class_names))))
    for label, name, upload in spec.images:
        image = decode_upload(upload.path.read_bytes(), name, upload.field, limits)
        folder = data_dir / folder_of[label]
        folder.mkdir(parents=True, exist_ok=True)
        counters[label] = counters.get(label, 0) + 1
        image.save(folder / f"{counters[label]:05d}.png", format="PNG")
