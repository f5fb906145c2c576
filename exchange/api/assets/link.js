// Copy buttons for the command blocks of exchange's pages (served as /assets/link.<hash>.js).
//
// The page works without this file: every command is plain, selectable text in a <pre> or
// <code>. With it, each block's "Copy" button (hidden until this script shows it) copies the
// block's text exactly as shown: through the asynchronous clipboard API where the page is a
// secure context, else by selecting the text and asking for a copy. Nothing here is fetched,
// stored or sent anywhere; the page's CSP allows this one same-origin script and nothing inline.
"use strict";

(function () {
  function selectAndCopy(block) {
    const selection = window.getSelection();
    const range = document.createRange();
    range.selectNodeContents(block);
    selection.removeAllRanges();
    selection.addRange(range);
    try {
      return document.execCommand("copy");
    } catch (_) {
      return false; // the text stays selected: Ctrl+C (or Cmd+C) copies it
    }
  }

  function say(button, copied) {
    button.textContent = copied ? "Copied" : "Press Ctrl+C";
    button.classList.toggle("copied", copied);
  }

  function copy(button, block) {
    const text = block.textContent;
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(
        function () { say(button, true); },
        function () { say(button, selectAndCopy(block)); }
      );
    } else {
      say(button, selectAndCopy(block));
    }
  }

  for (const button of document.querySelectorAll("button[data-copy]")) {
    const holder = button.closest(".command");
    const block = holder && holder.querySelector("pre, code");
    if (!block) {
      continue;
    }
    button.addEventListener("click", function () { copy(button, block); });
    button.hidden = false;
  }
})();
